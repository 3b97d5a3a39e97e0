"""Every config.json field of an HF GPT-2 folder (issue 19): GPT.from_pretrained either computes what
transformers' GPT2LMHeadModel computes from the same folder, or refuses the field by name in one line.

One tiny random GPT2LMHeadModel is saved once; each case copies the folder and edits its config.json.
An accepted value must give our logits equal to transformers' on that folder (float32, eval, 1e-4);
a refused value must be one that really changes what transformers computes (its logits differ from
the unedited folder's, or transformers itself cannot build the model), so that no refusal is arbitrary.
"""

import dataclasses
import json
import shutil

import pytest
import torch

from cli import UserError
from hf_gpt2 import IGNORED, REPRODUCED, SHAPE_ALIASES, SHAPE_KEYS
from train_gpt import GPT

transformers = pytest.importorskip("transformers")

SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
TOL = 1e-4  # fp32 max abs logit difference between our GPT and transformers'; a refused value moves them more


@pytest.fixture(scope="module", autouse=True)
def quiet_and_offline():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls gain nothing from threads on a shared machine
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # missing cross-attention weights etc. are expected here
        yield
        transformers.logging.set_verbosity(verbosity)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(the HF folder of a tiny GPT-2 whose weights are far from init, so every field shows in the logits,
    transformers' logits on it)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**SHAPE)).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        model.transformer.wte.weight.normal_(0.0, 0.3, generator=gen)
    path = tmp_path_factory.mktemp("hf") / "base"
    model.save_pretrained(path)
    return path, hf_logits(path)


IDX = torch.randint(0, SHAPE["vocab_size"], (2, SHAPE["n_positions"]), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def hf_logits(folder, auto: bool = False, **inputs) -> torch.Tensor:
    cls = transformers.AutoModelForCausalLM if auto else transformers.GPT2LMHeadModel
    return cls.from_pretrained(folder, dtype=torch.float32).eval()(IDX, **inputs).logits


def edited(base_path, tmp_path, **changes):
    folder = tmp_path / "edited"
    shutil.copytree(base_path, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def refusal(folder, key, value, ours) -> str:
    return f"{folder}: {key}={value!r} is not GPT-2's ({ours!r}); this model cannot load it"


# values GPT-2 does not have that our GPT computes exactly as transformers does
ACCEPTED = [
    ("activation_function", "gelu_pytorch_tanh"),
    ("activation_function", "gelu_python_tanh"),
    ("activation_function", "gelu_accurate"),
    ("activation_function", "gelu_fast"),
    ("n_inner", 4 * SHAPE["n_embd"]),
    ("reorder_and_upcast_attn", True),
    ("n_ctx", 16),
    ("resid_pdrop", 0.5),
    ("embd_pdrop", 0.5),
    ("attn_pdrop", 0.5),
    ("summary_type", "mean"),
    ("summary_first_dropout", 0.5),
    ("initializer_range", 1.0),
    ("pad_token_id", 0),
    ("bos_token_id", 1),
    ("eos_token_id", 2),
    ("chunk_size_feed_forward", 4),
    ("is_encoder_decoder", True),
    ("use_cache", False),
    ("output_hidden_states", True),
    ("output_attentions", True),
    ("dtype", "bfloat16"),
    ("torch_dtype", "float16"),
    ("attn_implementation", "eager"),
    ("architectures", ["GPT2DoubleHeadsModel"]),
    ("problem_type", "regression"),
    ("per_layer_config", {}),
    ("num_attention_heads", SHAPE["n_head"]),  # an alias that agrees
]


@pytest.mark.parametrize("key, value", ACCEPTED, ids=[f"{k}={v}" for k, v in ACCEPTED])
def test_accepted_value_gives_transformers_logits(base, tmp_path, key, value):
    folder = edited(base[0], tmp_path, **{key: value})
    ours = GPT.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        assert (ours(IDX)[0] - hf_logits(folder)).abs().max().item() <= TOL


# (key, value, GPT-2's value in the message); each changes what transformers computes
REFUSED = [
    ("activation_function", "gelu", "gelu_new"),  # the erf GELU
    ("activation_function", "relu", "gelu_new"),
    ("layer_norm_epsilon", 1e-6, 1e-5),
    ("n_inner", 64, None),
    ("tie_word_embeddings", False, True),
    ("scale_attn_weights", False, True),
    ("scale_attn_by_inverse_layer_idx", True, False),
    ("is_causal", False, True),
    ("add_cross_attention", True, False),
    ("model_type", "openai-gpt", "gpt2"),
    ("per_layer_config", {"1": {"layer_norm_epsilon": 0.1}}, None),
    ("quantization_config", {"quant_method": "bitsandbytes", "load_in_8bit": True}, None),
]


@pytest.mark.parametrize("key, value, ours", REFUSED, ids=[f"{k}={v}" for k, v, _ in REFUSED])
def test_refused_value_is_named_and_changes_transformers(base, tmp_path, key, value, ours):
    folder = edited(base[0], tmp_path, **{key: value})
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(str(folder))
    assert str(e.value) == refusal(folder, key, value, ours)
    # the proof: transformers computes something else from this folder
    if key == "add_cross_attention":  # used with an encoder's states, which GPT-2 (and ours) never takes
        states = torch.randn(IDX.size(0), 8, SHAPE["n_embd"], generator=torch.Generator().manual_seed(1))
        logits = hf_logits(folder, encoder_hidden_states=states)
    elif key == "model_type":  # the Auto classes build the architecture model_type names
        logits = hf_logits(folder, auto=True)
    elif key in ("n_inner", "per_layer_config"):  # transformers cannot build a GPT-2 of these weights either
        with pytest.raises((RuntimeError, ValueError)):  # the MLP's shapes; a per-layer layer_norm_epsilon
            hf_logits(folder)
        return
    elif key == "quantization_config":  # quantized on load where bitsandbytes is installed, else refused
        try:
            logits = hf_logits(folder)
        except ImportError:
            return
    else:
        logits = hf_logits(folder)
    assert (logits - base[1]).abs().max().item() > TOL


# wrong types: one line each, never a traceback (transformers' strict config refuses these too)
WRONG_TYPES = [
    ("layer_norm_epsilon", "1e-5", 1e-5),
    ("layer_norm_epsilon", None, 1e-5),
    ("scale_attn_weights", 1, True),  # JSON 1 is not true
    ("tie_word_embeddings", None, True),
    ("is_causal", 0, True),
    ("n_inner", "128", None),
    ("n_inner", 128.0, None),
    ("activation_function", ["gelu_new"], "gelu_new"),
    ("model_type", None, "gpt2"),
]


@pytest.mark.parametrize("key, value, ours", WRONG_TYPES, ids=[f"{k}={v!r}" for k, v, _ in WRONG_TYPES])
def test_wrong_type_is_one_line(base, tmp_path, key, value, ours):
    folder = edited(base[0], tmp_path, **{key: value})
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(str(folder))
    assert str(e.value) == refusal(folder, key, value, ours)


@pytest.mark.parametrize("value", [None, "2", 2.0, True, 0])
def test_shape_key_of_wrong_type_is_one_line(base, tmp_path, value):
    folder = edited(base[0], tmp_path, n_head=value)
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(str(folder))
    assert str(e.value) == f"{folder}: config.json lacks positive integers for n_head"


def test_shape_alias_that_disagrees_is_refused(base, tmp_path):
    """transformers reads num_attention_heads over n_head: 4 heads of 8 over the same weights."""
    folder = edited(base[0], tmp_path, num_attention_heads=4)
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(str(folder))
    assert str(e.value) == (
        f"{folder}: num_attention_heads=4 and n_head=2 disagree (transformers reads num_attention_heads); "
        "this model cannot load it"
    )
    assert (hf_logits(folder) - base[1]).abs().max().item() > TOL


def test_shape_alias_alone_is_read(base, tmp_path):
    folder = edited(base[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = config.pop("n_layer")
    (folder / "config.json").write_text(json.dumps(config))
    ours = GPT.from_pretrained(str(folder)).eval()
    assert ours.config.n_layer == SHAPE["n_layer"]
    with torch.no_grad():
        assert (ours(IDX)[0] - hf_logits(folder)).abs().max().item() <= TOL


def test_every_gpt2config_field_has_a_decision():
    """A field a future transformers adds to GPT2Config fails here until hf_gpt2.py decides it."""
    fields = {f.name for f in dataclasses.fields(transformers.GPT2Config)}
    fields |= set(transformers.GPT2Config().to_dict()) | set(transformers.GPT2Config.attribute_map)
    decided = set(REPRODUCED) | set(IGNORED) | set(SHAPE_KEYS) | set(SHAPE_ALIASES)
    assert sorted(fields - decided) == []
    assert not set(REPRODUCED) & set(IGNORED)
