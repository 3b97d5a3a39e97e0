"""Tests of how train_gpt.py meets the outside world: Hugging Face GPT-2 weights in and out, greedy
decoding against transformers' own generate, seeded sampling, and the curves.png plots.

The reference model is a tiny random GPT2LMHeadModel saved to a temp folder: nothing here uses the
network. Its weights are perturbed away from GPT-2's init (biases and layer norms non-trivial, a
wide embedding) so that a transposed, dropped or misplaced tensor changes the logits, and so that its
predictions are peaked: its loss is far from the uniform ln(vocab) of a fresh model, and greedy
decoding has no near-ties.

Exports (sample.py --export-hf) must load in transformers with no network at all: its AutoTokenizer
encodes as our tiktoken GPT-2 encoding does, and its text-generation pipeline decodes greedily as
sample.py does.
"""

import json
import math
import re
import shutil
import socket
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_script, train_losses, write_shards

import sample
from plots import read_log
from tokenizer import EOT, get_tokenizer, gpt2_bpe_files
from train_gpt import (
    GPT,
    GPT2_VOCAB,
    GPTConfig,
    UserError,
    main,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STEP_LOSS_RE = re.compile(r"^step\s+(\d+) \| loss: (\S+) \|", re.M)  # step -> the loss as printed
HF_SHAPE = dict(n_layer=2, n_head=2, n_embd=32)
HF_POSITIONS = 64
TOL = 1e-4  # fp32 max abs logit difference allowed between our GPT and transformers'
PROMPT = "Hello, I'm a language model,"  # sample.py's default
# a short fine-tuning or training run: one 2 x 32 micro-batch per step
# float32: the comparisons against transformers are exact to 1e-4, which bf16 autocast (the CPU default
# where the CPU has native bf16) is not
BATCH = [
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--total-batch-size",
    "64",
    "--warmup-steps",
    "1",
    "--dtype",
    "float32",
]
# TINY without its shape flags: --init-from takes the shape from its source and refuses them
UNSHAPED = ["--hellaswag-every", "0", "--sample-every", "0"]
EXPORT_FILES = [
    "config.json",
    "generation_config.json",
    "merges.txt",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer_config.json",
    "vocab.json",
]
# multilingual, emoji, runs of spaces, tabs and newlines, trailing spaces: where BPE pre-tokenizers differ
MULTILINGUAL = "Hello  world\n\n\tÜnïcödé 日本語 🙂  <|endoftext|>  trailing   "
# spaces before punctuation and contractions: what a decoder's "clean-up" would change
SPACED = "Hello , world . It 's a test ! Isn 't it ? ( yes ) 3 . 5 %"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared machine a second one costs 10x or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub: for transformers in this process (huggingface_hub reads these at import) and the scripts run here."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def transformers(offline):
    return pytest.importorskip("transformers")


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every DNS lookup and connection attempt fails, and is recorded: a test asserts the list stays empty."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def perturb(model: torch.nn.Module, wte: torch.nn.Parameter, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # wte and the tied head are one tensor, listed once
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
        wte.normal_(0.0, 0.3, generator=gen)


@pytest.fixture(scope="module")
def hf_model(transformers, tmp_path_factory):
    """(random GPT2LMHeadModel in eval mode, the HF folder it was saved to)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=GPT2_VOCAB, n_positions=HF_POSITIONS, **HF_SHAPE)
    model = transformers.GPT2LMHeadModel(config).eval()
    perturb(model, model.transformer.wte.weight, seed=0)
    path = tmp_path_factory.mktemp("hf") / "hf"
    model.save_pretrained(path)
    assert (path / "model.safetensors").is_file()
    return model, path


@pytest.fixture(scope="module")
def ours_padded():
    """One of our models as the trainer makes them: random init, vocab padded to 50304."""
    torch.manual_seed(1)
    model = GPT(GPTConfig(block_size=HF_POSITIONS, vocab_size=50304, **HF_SHAPE)).eval()
    perturb(model, model.transformer.wte.weight, seed=1)
    return model


@pytest.fixture(scope="module")
def chatty() -> GPT:
    """Another of ours, with position embeddings so strong that greedy decoding moves on from token to
    token instead of repeating one: a continuation that tells a misplaced position or token apart."""
    torch.manual_seed(6)
    model = GPT(GPTConfig(block_size=HF_POSITIONS, vocab_size=50304, **HF_SHAPE)).eval()
    perturb(model, model.transformer.wte.weight, seed=6)
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(6))
    return model


@pytest.fixture(scope="module")
def exported(chatty, tmp_path_factory):
    """`sample.py --model model_00010.pt --export-hf DIR` run as a user runs it: (result, the .pt, DIR)."""
    root = tmp_path_factory.mktemp("export")
    ckpt = save_tiny_checkpoint(chatty, root / "model_00010.pt", step=10, val_loss=3.25)
    out = root / "gpt2-ours"
    return run_script("sample.py", "--model", str(ckpt), "--export-hf", str(out)), ckpt, out


def save_tiny_checkpoint(model: GPT, path: Path, **extra) -> Path:
    """The fields of the trainer's checkpoints that loading reads (plus any extra ones, which it ignores)."""
    torch.save({"model": model.state_dict(), "config": asdict(model.config), **extra}, path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder, by its path relative to it: its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tokens(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randint(0, GPT2_VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def hf_logits(hf, idx: torch.Tensor) -> torch.Tensor:
    return hf(idx).logits


@torch.no_grad()
def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    return model(idx)[0]


@torch.no_grad()
def plain_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding the slow, obvious way: the whole sequence through the model for every token."""
    for _ in range(n):
        nxt = model(idx)[0][:, -1, :GPT2_VOCAB].argmax(-1)
        idx = torch.cat((idx, nxt[:, None]), dim=1)
    return idx


def check_png(path: Path, panels: int) -> None:
    """A real PNG, readable back, of the size plot_curves draws: 5x4 inches per panel at 100 dpi."""
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape == (400, 500 * panels, 4)
    assert pixels[..., :3].min() < 0.5 < pixels[..., :3].max()  # something is drawn on the white
    assert not list(path.parent.glob("*.tmp*")), "the atomic write left its temp file behind"


# -----------------------------------------------------------------------------
# importing HF GPT-2 weights


def test_import_from_hf_folder_matches_transformers(hf_model):
    hf, path = hf_model
    ours = GPT.from_pretrained(str(path)).eval()
    assert ours.config == GPTConfig(block_size=HF_POSITIONS, vocab_size=GPT2_VOCAB, **HF_SHAPE)
    idx = tokens((2, HF_POSITIONS))  # every position, so every wpe row counts
    assert max_diff(our_logits(ours, idx), hf_logits(hf, idx)) <= TOL


@pytest.mark.parametrize("layout", ["openai", "transformers"])
def test_import_from_pytorch_model_bin(hf_model, tmp_path, layout):
    """Folders with a pickled pytorch_model.bin instead of safetensors. 'openai' is the layout of the
    original hub checkpoints: no `transformer.` prefix, the causal-mask buffers, no lm_head;
    'transformers' is a state dict as the library holds it, with the tied lm_head."""
    hf, path = hf_model
    state = hf.state_dict()
    if layout == "openai":
        state = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        mask = torch.tril(torch.ones(HF_POSITIONS, HF_POSITIONS, dtype=torch.bool))[None, None]
        for i in range(HF_SHAPE["n_layer"]):
            state[f"h.{i}.attn.bias"] = mask
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(path / "config.json", folder / "config.json")
    torch.save(state, folder / "pytorch_model.bin")
    ours = GPT.from_pretrained(str(folder)).eval()
    idx = tokens((2, HF_POSITIONS))
    assert max_diff(our_logits(ours, idx), hf_logits(hf, idx)) <= TOL


# -----------------------------------------------------------------------------
# exporting our checkpoints as HF folders


def test_save_pretrained_loads_in_transformers(transformers, ours_padded, tmp_path):
    out = tmp_path / "export"
    ours_padded.save_pretrained(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == GPT2_VOCAB  # the 47 padding rows are not tokens
    assert (config["n_positions"], config["n_layer"], config["n_head"], config["n_embd"]) == (64, 2, 2, 32)
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), f"weights transformers did not take as they were: {info}"
    idx = tokens((2, HF_POSITIONS))
    want = our_logits(ours_padded, idx)[..., :GPT2_VOCAB]
    assert max_diff(hf_logits(hf.eval(), idx), want) <= TOL
    back = GPT.from_pretrained(str(out)).eval()
    assert back.config == GPTConfig(block_size=HF_POSITIONS, vocab_size=GPT2_VOCAB, **HF_SHAPE)
    assert max_diff(our_logits(back, idx), want) <= TOL


@pytest.mark.slow
def test_sample_cli_exports_a_checkpoint(transformers, chatty, exported):
    r, _, out = exported
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"wrote {out} (transformers' AutoModelForCausalLM and AutoTokenizer load it offline)\n"
    assert sorted(p.name for p in out.iterdir()) == EXPORT_FILES  # no temp files left behind
    merges, vocab = gpt2_bpe_files()
    assert (out / "merges.txt").read_bytes() == merges.read_bytes()
    assert (out / "vocab.json").read_bytes() == vocab.read_bytes()
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = tokens((1, 16), seed=3)
    assert max_diff(hf_logits(hf, idx), our_logits(chatty, idx)[..., :GPT2_VOCAB]) <= TOL


@pytest.mark.slow
def test_exported_tokenizer_and_model_load_offline(transformers, chatty, exported, no_network):
    _, _, out = exported
    tok = transformers.AutoTokenizer.from_pretrained(out)
    enc = get_tokenizer()
    plain = MULTILINGUAL.replace("<|endoftext|>", "")
    assert tok(plain)["input_ids"] == enc.encode_ordinary(plain)
    # HF's GPT-2 tokenizer reads a literal <|endoftext|> in the text as its special token (tiktoken's
    # encode_ordinary spells it out as plain text): the same as tiktoken with that special allowed
    ids = tok(MULTILINGUAL)["input_ids"]
    assert ids == enc.encode(MULTILINGUAL, allowed_special={"<|endoftext|>"}) and ids.count(EOT) == 1
    assert ids != enc.encode_ordinary(MULTILINGUAL)
    # decoding gives back the text, spaces before punctuation included
    for text in (plain, SPACED):
        assert tok.decode(enc.encode_ordinary(text)) == text
    assert tok.eos_token_id == tok.bos_token_id == EOT

    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = tokens((2, HF_POSITIONS), seed=4)
    assert max_diff(hf_logits(hf, idx), our_logits(chatty, idx)[..., :GPT2_VOCAB]) <= TOL
    assert no_network == []


@pytest.mark.slow
def test_exported_tokenizer_pins_how_it_decodes(exported):
    """transformers 4.x cleans up spaces before punctuation when a tokenizer_config.json leaves
    clean_up_tokenization_spaces unset (" ," -> ","; v5 made False the default), so an export decodes
    as tiktoken and sample.py do, under every transformers version, only if it says so itself."""
    _, _, out = exported
    assert json.loads((out / "tokenizer_config.json").read_text()).get("clean_up_tokenization_spaces") is False


@pytest.mark.slow
def test_pipeline_greedy_text_equals_sample_py(transformers, chatty, exported, no_network, capsys):
    _, ckpt, out = exported
    pipe = transformers.pipeline("text-generation", model=str(out))
    got = pipe(PROMPT, do_sample=False, max_new_tokens=12, return_full_text=False)[0]["generated_text"]

    # the continuation, token by token: non-trivial, clear of near-ties, no <|endoftext|> for HF to stop at
    prompt = get_tokenizer().encode_ordinary(PROMPT)
    new = chatty.generate(torch.tensor([prompt]), 12, temperature=0)[0, len(prompt) :]
    logits = our_logits(chatty, torch.tensor([prompt + new.tolist()]))[0, len(prompt) - 1 : -1, :GPT2_VOCAB]
    top2 = logits.topk(2).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-2  # 100x the logits' float error: no argmax can flip
    assert EOT not in new.tolist() and len(set(new.tolist())) >= 8
    assert got == get_tokenizer().decode(new.tolist()) and got.strip()

    flags = ["--temperature", "0", "--max-new-tokens", "12", "--num-samples", "1", "--no-stop-at-eot"]
    for source in (ckpt, out):  # the trainer's checkpoint and its export decode alike
        sample.main(["--model", str(source), *flags, "--device", "cpu", "--dtype", "float32"])
        assert capsys.readouterr().out == f"--- sample 0\n{PROMPT}{got}\n"
    assert no_network == []


def test_export_into_a_non_empty_folder_is_refused(chatty, tmp_path, capsys):
    ckpt = save_tiny_checkpoint(chatty, tmp_path / "model_00010.pt")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "config.json").write_text('{"mine": true}')
    (taken / "notes.txt").write_bytes(b"not yours\n")
    a_file = tmp_path / "a_file"
    a_file.write_bytes(b"a file, not a folder")
    before = snapshot(tmp_path)
    for target in (taken, a_file):
        with pytest.raises(SystemExit) as e:
            sample.main(["--model", str(ckpt), "--export-hf", str(target)])
        assert e.value.code == 1
        assert capsys.readouterr() == (
            "",
            f"error: --export-hf {target} already exists and is not an empty folder; choose a new one\n",
        )
    assert snapshot(tmp_path) == before and snapshot(taken) == {
        "config.json": b'{"mine": true}',
        "notes.txt": b"not yours\n",
    }

    empty = tmp_path / "empty"  # an empty folder is as good as a new one
    empty.mkdir()
    sample.main(["--model", str(ckpt), "--export-hf", str(empty)])
    assert capsys.readouterr().out.startswith(f"wrote {empty} ")
    assert sorted(p.name for p in empty.iterdir()) == EXPORT_FILES


# -----------------------------------------------------------------------------
# fine-tuning from an HF folder


@pytest.fixture(scope="module")
def finetune(hf_model, tmp_path_factory):
    """A 2-step `--init-from <hf folder>` run on random shards: (result, val shard, train shard 1, log dir, flags)."""
    _, path = hf_model
    root = tmp_path_factory.mktemp("finetune")
    val, train, _ = write_shards(root / "data")
    log_dir = root / "log"
    # the shape comes from the HF folder: --init-from refuses shape flags
    args = [*UNSHAPED, *BATCH, "--init-from", str(path), "--data-dir", str(root / "data"), "--log-dir", str(log_dir)]
    r = run_script("train_gpt.py", *args, "--max-steps", "2", "--eval-every", "2", "--eval-steps", "2")
    return r, val, train, log_dir, args


@torch.no_grad()
def hf_loss(hf, window: np.ndarray) -> float:
    """build-nanogpt's loss on one window of B*T+1 tokens, from transformers' logits."""
    buf = torch.from_numpy(window.astype(np.int64))
    x, y = buf[:-1].view(2, 32), buf[1:].view(2, 32)
    return F.cross_entropy(hf(x).logits.flatten(0, 1), y.flatten()).item()


@pytest.mark.slow
def test_init_from_hf_folder_starts_from_its_weights(hf_model, finetune):
    hf, _ = hf_model
    r, val, train, log_dir, _ = finetune
    assert r.returncode == 0, r.stderr
    assert "{'block_size': 64, 'vocab_size': 50257, 'n_layer': 2, 'n_head': 2, 'n_embd': 32" in r.stdout
    # step-0 validation: the mean over --eval-steps 2 of val windows 0 and 1 (B*T = 64 tokens apart)
    want_val = (hf_loss(hf, val[0:65]) + hf_loss(hf, val[64:129])) / 2
    assert abs(want_val - math.log(50304)) > 1.0  # so a fresh model's ~ln(V) cannot pass for it
    val_lines = [
        float(line.split(": ")[1].split(" |")[0]) for line in r.stdout.splitlines() if line.startswith("validation")
    ]
    assert len(val_lines) == 2  # steps 0 and 2
    assert abs(val_lines[0] - want_val) <= TOL
    log = read_log(str(log_dir / "log.txt"))
    assert log["val"][0] == [0, 2] and abs(log["val"][1][0] - want_val) <= TOL
    # step 0 trains on train window 0 before any update: the HF model's loss on it
    assert abs(train_losses(r.stdout)[0] - hf_loss(hf, train[0:65])) <= TOL
    assert (log_dir / "model_00002.pt").is_file()


@pytest.mark.slow
def test_init_from_run_resumes(finetune, tmp_path):
    """The 2-step --init-from run, resumed to 3 steps, is the uninterrupted 3-step --init-from run: its losses as
    printed and its final weights and AdamW state, exactly (warmup 1: steps 0 and 1 have the same LR in both)."""
    r, _, _, log_dir, args = finetune
    assert r.returncode == 0, r.stderr
    resumed, whole = tmp_path / "log", tmp_path / "whole"
    shutil.copytree(log_dir, resumed)
    more = ["--max-steps", "3", "--eval-every", "2", "--eval-steps", "2"]
    r2 = run_script("train_gpt.py", *[a if a != str(log_dir) else str(resumed) for a in args], *more, "--resume")
    assert r2.returncode == 0, r2.stderr
    assert f"resume: restored the run's flags from {resumed / 'model_00002.pt'}: " in r2.stdout
    assert "resuming at step 2" in r2.stdout
    assert sorted(train_losses(r2.stdout)) == [2]
    ref = run_script("train_gpt.py", *[a if a != str(log_dir) else str(whole) for a in args], *more)
    assert ref.returncode == 0, ref.stderr
    printed = [{k: v for k, v in STEP_LOSS_RE.findall(out)} for out in (r.stdout, r2.stdout, ref.stdout)]
    assert sorted(printed[2]) == ["0", "1", "2"] and len(set(printed[2].values())) == 3
    assert {**printed[0], **printed[1]} == printed[2]
    # the val loss after the last step, from the same weights
    assert (
        r2.stdout.splitlines()[-1] == ref.stdout.splitlines()[-1] and "validation loss" in ref.stdout.splitlines()[-1]
    )
    final, want = (torch.load(d / "model_00003.pt", weights_only=True) for d in (resumed, whole))
    assert final["model"].keys() == want["model"].keys()
    assert all(torch.equal(final["model"][k], v) for k, v in want["model"].items())
    states = [{(n, k): v for n, s in c["optimizer"]["state"].items() for k, v in s.items()} for c in (final, want)]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], v) for k, v in states[1].items())


# -----------------------------------------------------------------------------
# decoding: the KV cache against transformers, and seeded sampling


def test_greedy_generate_matches_transformers(hf_model):
    hf, path = hf_model
    ours = GPT.from_pretrained(str(path)).eval()
    idx = tokens((2, 8), seed=5)
    want = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=20, do_sample=False, pad_token_id=EOT)
    # transformers stops at its eos; the comparison below assumes it never got there
    assert want.shape == (2, 28) and EOT not in want[:, 8:]
    got = ours.generate(idx, 20, temperature=0)
    assert torch.equal(got, want)
    assert torch.equal(got, plain_greedy(ours, idx, 20))


def test_sampling_is_reproducible_with_a_generator(hf_model):
    _, path = hf_model
    ours = GPT.from_pretrained(str(path)).eval()
    idx = tokens((1, 8), seed=6).repeat(3, 1)  # one prompt thrice: rows must still differ

    def sample(seed: int, **kw) -> torch.Tensor:
        return ours.generate(idx, 20, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    for kw in ({}, {"top_k": 50}, {"top_k": 50, "top_p": 0.9}):
        torch.manual_seed(100)  # the global RNG must play no part
        a = sample(1, **kw)
        torch.manual_seed(200)
        assert torch.equal(sample(1, **kw), a), kw
        assert not torch.equal(sample(2, **kw), a), kw
        assert not torch.equal(a[0], a[1]), "rows of a batch share one random stream, not one draw"


def expected_sample_stdout(model: GPT, n: int, max_new: int, seed: int, temperature: float) -> str:
    """What sample.py prints for its default prompt, top-k 50 and stop-at-eot, computed here."""
    enc = get_tokenizer()
    prompt = enc.encode_ordinary(PROMPT)
    idx = torch.tensor([prompt] * n)
    gen = torch.Generator().manual_seed(seed)
    out = model.generate(idx, max_new, temperature=temperature, top_k=50, top_p=1.0, eos=EOT, generator=gen)
    text = ""
    for i, row in enumerate(out.tolist()):
        new = row[len(prompt) :]
        new = new[: new.index(EOT)] if EOT in new else new
        text += f"--- sample {i}\n{PROMPT}{enc.decode(new)}\n"
    return text.replace("\r\n", "\n").replace("\r", "\n")  # as text-mode pipes read it


def sample_in_process(argv: list[str], capsys) -> str:
    """sample.py's stdout from its main(), line ends as a text-mode pipe reads them."""
    sample.main(argv)
    return capsys.readouterr().out.replace("\r\n", "\n").replace("\r", "\n")


@pytest.mark.slow
def test_sample_cli_is_reproducible(hf_model, capsys):
    _, path = hf_model
    # float32, as expected_sample_stdout: --dtype auto samples in bf16 on a CPU with native bf16
    args = ["--model", str(path), "--seed", "1", "--max-new-tokens", "10", "--num-samples", "2", "--dtype", "float32"]
    r = run_script("sample.py", *args)
    assert r.returncode == 0, r.stderr
    torch.manual_seed(123)  # the global RNG must play no part: a run in this process prints the same
    assert sample_in_process(args, capsys) == r.stdout
    ours = GPT.from_pretrained(str(path)).eval()
    assert r.stdout == expected_sample_stdout(ours, 2, 10, seed=1, temperature=1.0)
    samples = r.stdout.split("--- sample ")[1:]
    assert len(samples) == 2 and samples[0][1:] != samples[1][1:]
    assert sample_in_process([*args, "--seed", "2"], capsys) != r.stdout  # another seed (the last flag wins)


def test_sample_cli_greedy_samples_are_identical(hf_model, capsys):
    _, path = hf_model
    args = ["--model", str(path), "--temperature", "0", "--max-new-tokens", "10", "--num-samples", "3"]
    out = sample_in_process([*args, "--dtype", "float32"], capsys)  # float32, as expected_sample_stdout
    samples = out.split("--- sample ")[1:]
    assert [s[:2] for s in samples] == ["0\n", "1\n", "2\n"]
    assert samples[0][1:] == samples[1][1:] == samples[2][1:]
    ours = GPT.from_pretrained(str(path)).eval()
    assert out == expected_sample_stdout(ours, 3, 10, seed=42, temperature=0)


# -----------------------------------------------------------------------------
# curves.png


@pytest.mark.slow
def test_training_run_draws_curves_png(shards, tmp_path):
    log_dir = tmp_path / "log"
    r = run_script(
        "train_gpt.py",
        *TINY,
        *BATCH,
        "--data-dir",
        str(shards),
        "--log-dir",
        str(log_dir),
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--eval-steps",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "could not draw" not in r.stderr
    log = read_log(str(log_dir / "log.txt"))
    assert log["val"][0] == [0, 2, 4] and log["lr"][0] == [0, 1, 2, 3] and "hella" not in log
    check_png(log_dir / "curves.png", panels=3)  # loss, val perplexity, learning rate; no HellaSwag panel


# build-nanogpt's log.txt: at each eval step its val line, then hella, then the step's train line
NANOGPT_LOG = """\
0 val 10.9876
0 hella 0.2500
0 train 10.987654
1 train 10.500000
2 train 9.876543
3 train 9.123456
4 train 8.765432
5 val 8.5432
5 hella 0.2625
"""


def test_plot_mode_reads_a_build_nanogpt_log(tmp_path, capsys):
    log = tmp_path / "run" / "log.txt"
    log.parent.mkdir()
    log.write_text(NANOGPT_LOG)
    assert read_log(str(log)) == {
        "val": ([0, 5], [10.9876, 8.5432]),
        "hella": ([0, 5], [0.25, 0.2625]),
        "train": ([0, 1, 2, 3, 4], [10.987654, 10.5, 9.876543, 9.123456, 8.765432]),
    }
    main(["--plot", str(log)])  # in-process: the training run above draws its plot in a subprocess
    assert capsys.readouterr() == (f"wrote {log.parent / 'curves.png'}\n", "")
    check_png(log.parent / "curves.png", panels=3)


def test_plot_mode_missing_log_is_one_line_error(tmp_path, capsys):
    missing = tmp_path / "nope" / "log.txt"
    with pytest.raises(SystemExit) as e:
        main(["--plot", str(missing)])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: --plot {missing}: no such log file\n")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(
    "key, value", [("tie_word_embeddings", False), ("activation_function", "relu"), ("layer_norm_epsilon", 1e-6)]
)
def test_hf_config_this_model_cannot_reproduce_is_refused(hf_model, tmp_path, key, value):
    _, path = hf_model
    folder = tmp_path / "hf"
    shutil.copytree(path, folder)
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        GPT.from_pretrained(str(folder))
    assert (
        str(e.value) == f"{folder}: {key}={value!r} is not GPT-2's ({GPT_DEFAULTS[key]!r}); this model cannot load it"
    )


GPT_DEFAULTS = {"tie_word_embeddings": True, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5}
