"""HellaSwag scoring: the batched scorer against build-nanogpt's one-at-a-time reference (kept here,
as the test's own slow-but-obvious scorer) and against losses computed by hand, the in-training eval
across ranks, and hellaswag.py as a user runs it."""

import io
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, SHARED_DATA, TINY, run_script

import checkpoint
import hellaswag
import hellaswag_eval
import tokenizer
import train_gpt
from train_gpt import GPT, GPTConfig, Runtime

HELLASWAG_DIR = SHARED_DATA / "hellaswag"
FINAL_LINE = re.compile(r"hellaswag: acc_norm=(\d\.\d{4}) acc=(\d\.\d{4}) n=(\d+)")
CPU = Runtime("cpu", torch.float32)  # float32: no autocast
# urllib honours these: every download attempt goes to a closed local port and fails at once
NO_NETWORK = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


@torch.no_grad()
def one_at_a_time(model: GPT, rendered: list, rt: Runtime = CPU) -> list[tuple[int, int]]:
    """(pred, pred_norm) per example, build-nanogpt's way: one example (4 rows) per forward pass, full
    logits, F.cross_entropy on the shifted tokens, masked to the ending. Slow but obviously right: the
    reference that the batched hellaswag_eval.score_hellaswag must agree with."""
    was_training = model.training
    model.eval()
    preds = []
    for ctx, endings, _ in rendered:
        rows = [ctx + end for end in endings]
        L = max(len(r) for r in rows)
        tokens = torch.zeros((4, L), dtype=torch.long)
        mask = torch.zeros((4, L), dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, len(ctx) : len(row)] = 1
        tokens, mask = tokens.to(rt.device), mask.to(rt.device)
        with rt.autocast():
            logits, _ = model(tokens)
        # position t predicts token t+1, so the losses shift by one and so does the mask
        losses = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1), reduction="none"
        ).view(4, -1)
        shift_mask = mask[:, 1:]
        sum_loss = (losses * shift_mask).sum(dim=1)
        avg_loss = sum_loss / shift_mask.sum(dim=1)
        preds.append((int(sum_loss.argmin()), int(avg_loss.argmin())))
    model.train(was_training)
    return preds


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32)).eval()


@pytest.fixture(scope="module")
def real_examples() -> list:
    if not (HELLASWAG_DIR / "hellaswag_val.jsonl").exists():
        pytest.skip("../shared HellaSwag data is absent")
    enc = tokenizer.get_tokenizer()
    return [
        hellaswag_eval.render_hellaswag(ex, enc) for ex in hellaswag_eval.load_hellaswag("val", str(HELLASWAG_DIR), 40)
    ]


@pytest.fixture(scope="module")
def real_reference(model, real_examples) -> list[tuple[int, int]]:
    return one_at_a_time(model, real_examples)


def hand_losses(model: GPT, ctx: list[int], endings: list[list[int]]) -> list[tuple[float, float]]:
    """(summed, mean) loss of each ending: each row on its own, unpadded, log_softmax in float64."""
    out = []
    for end in endings:
        with torch.no_grad():
            logits, _ = model(torch.tensor([ctx + end]))
        # position t predicts token t+1: the ending's tokens come from the rows before each of them
        logp = torch.log_softmax(logits[0, len(ctx) - 1 : len(ctx) + len(end) - 1].double(), dim=-1)
        nll = [-logp[j, tok].item() for j, tok in enumerate(end)]
        out.append((sum(nll), sum(nll) / len(nll)))
    return out


def hand_preds(model: GPT, rendered: list, min_gap: float = 1e-4) -> list[tuple[int, int]]:
    """(pred, pred_norm) from hand_losses, checking each winner is clear of float rounding."""
    preds = []
    for ctx, endings, _ in rendered:
        losses = hand_losses(model, ctx, endings)
        pair = []
        for k in (0, 1):
            ranked = sorted(range(4), key=lambda i: losses[i][k])
            assert losses[ranked[1]][k] - losses[ranked[0]][k] > min_gap, "a near-tie would make this test fragile"
            pair.append(ranked[0])
        preds.append(tuple(pair))
    return preds


def crafted(n: int, seed: int = 0) -> list:
    """Random-token examples of varied context and ending lengths, labels 0..3."""
    g = torch.Generator().manual_seed(seed)

    def tokens(lo: int, hi: int) -> list[int]:
        k = int(torch.randint(lo, hi + 1, (), generator=g))
        return torch.randint(0, train_gpt.GPT2_VOCAB, (k,), generator=g).tolist()

    return [
        (tokens(1, 20), [tokens(1, 8) for _ in range(4)], int(torch.randint(0, 4, (), generator=g))) for _ in range(n)
    ]


def greedy(model: GPT, ctx: list[int], k: int) -> list[int]:
    """k greedily decoded tokens after ctx: each is the model's most likely, so the loss per token is low."""
    out = model.generate(torch.tensor([ctx]), k, temperature=0.0)
    return out[0, len(ctx) :].tolist()


def accuracies(preds: list[tuple[int, int]], rendered: list) -> tuple[float, float]:
    """(acc_norm, acc) of the predictions against the labels."""
    labels = [label for *_, label in rendered]
    acc_norm = sum(pn == label for (_, pn), label in zip(preds, labels)) / len(labels)
    acc = sum(p == label for (p, _), label in zip(preds, labels)) / len(labels)
    return acc_norm, acc


def save_tiny_checkpoint(model: GPT, path: Path) -> Path:
    """What hellaswag.py needs of a trainer's checkpoint: the weights and the shape."""
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, path)
    return path


def write_examples(folder: Path, examples: list[dict], split: str = "val") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / f"hellaswag_{split}.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    return folder


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so tqdm draws its bar there."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def keep_matmul_precision():
    """main() of either script sets the float32 matmul precision; other tests in this process keep theirs."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


# --- batched == one at a time == by hand -----------------------------------------------------------


def test_batched_equals_one_at_a_time_on_real_examples(model, real_examples, real_reference):
    assert len(set(real_reference)) > 4  # the model has opinions: the predictions are not all alike
    assert hellaswag_eval.score_hellaswag(model, real_examples, CPU) == real_reference
    assert hellaswag_eval.score_hellaswag(model, real_examples, CPU, batch_size=7) == real_reference


CRAFTED = crafted(13)


@pytest.fixture(scope="module")
def crafted_reference(model) -> list[tuple[int, int]]:
    reference = one_at_a_time(model, CRAFTED)
    assert reference == hand_preds(model, CRAFTED)
    return reference


@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])  # 3 leaves a short last batch; 16 is one batch of all
def test_batched_equals_one_at_a_time_on_crafted_examples(model, crafted_reference, batch_size):
    assert hellaswag_eval.score_hellaswag(model, CRAFTED, CPU, batch_size=batch_size) == crafted_reference


def test_scoring_restores_the_models_mode(model, crafted_reference):
    model.train()
    try:  # dropout is 0, but a caller's train mode must survive an eval in the middle of training
        assert hellaswag_eval.score_hellaswag(model, CRAFTED, CPU, batch_size=5) == crafted_reference
        assert model.training
    finally:
        model.eval()
    assert hellaswag_eval.score_hellaswag(model, CRAFTED[:3], CPU) == crafted_reference[:3] and not model.training


def test_acc_and_acc_norm_by_hand_with_endings_of_different_lengths(model):
    """A long ending of likely tokens wins on mean loss, a one-token ending on summed loss."""
    g = torch.Generator().manual_seed(1)
    rand = lambda k: torch.randint(0, train_gpt.GPT2_VOCAB, (k,), generator=g).tolist()  # noqa: E731
    rendered = []
    for label in (1, 1, 0, 2):  # the ending the label names: long, long, short, a medium one
        ctx = rand(8)
        endings = [rand(1), greedy(model, ctx, 6), rand(3), rand(3)]
        rendered.append((ctx, endings, label))

    for ctx, endings, _ in rendered:
        (short_sum, short_mean), (long_sum, long_mean), *medium = hand_losses(model, ctx, endings)
        assert long_sum > short_sum + 1 and long_mean < short_mean - 0.05  # the designed disagreement
        assert all(s > short_sum + 1 and m > long_mean + 0.05 for s, m in medium)
    expected = [(0, 1)] * 4
    assert hand_preds(model, rendered) == expected
    assert one_at_a_time(model, rendered) == expected
    assert hellaswag_eval.score_hellaswag(model, rendered, CPU, batch_size=3) == expected
    assert hellaswag_eval.evaluate_hellaswag(model, rendered, CPU) == (0.5, 0.25, 4)


# --- the in-training eval: 2 ranks == 1 rank --------------------------------------------------------

RANK_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import checkpoint
import hellaswag_eval
import train_gpt

dist.init_process_group("gloo")
model = train_gpt.model_from_checkpoint(checkpoint.load_checkpoint(sys.argv[1]), sys.argv[1])
with open(sys.argv[2]) as f:
    rendered = json.load(f)
rt = train_gpt.Runtime("cpu", torch.float32)
result = hellaswag_eval.evaluate_hellaswag(model, rendered, rt, dist.get_rank(), dist.get_world_size())
if dist.get_rank() == 0:
    with open(sys.argv[3], "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_evaluate_hellaswag_two_ranks_equals_one(model, tmp_path):
    rendered = crafted(11, seed=2)  # odd: rank 0 scores 6 examples, rank 1 scores 5
    preds = hand_preds(model, rendered)
    # labels that make both accuracies neither 0 nor 1, and differ from each other
    rendered = [(c, e, [p[1], p[0], (p[1] + 1) % 4][i % 3]) for i, ((c, e, _), p) in enumerate(zip(rendered, preds))]
    expected = (*accuracies(preds, rendered), 11)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1 and expected[0] != expected[1]
    assert hellaswag_eval.evaluate_hellaswag(model, rendered, CPU) == expected

    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(root=str(ROOT)))
    ckpt = save_tiny_checkpoint(model, tmp_path / "model_00000.pt")
    (tmp_path / "rendered.json").write_text(json.dumps(rendered))
    out = tmp_path / "result.json"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    r = run_script(*args, str(ckpt), str(tmp_path / "rendered.json"), str(out), timeout=300)
    assert r.returncode == 0, r.stderr
    assert tuple(json.loads(out.read_text())) == expected


# --- hellaswag.py and train_gpt.py as a user runs them -----------------------------------------------

TEXT_EXAMPLES = [
    {
        "ctx": "The man picks up the guitar and",
        "endings": ["plays a song.", "eats it.", "flies away.", "is a cat."],
        "label": 0,
    },
    {
        "ctx": "She opens the oven door and",
        "endings": ["sings.", "takes out the bread.", "runs.", "sleeps."],
        "label": 1,
    },
    {
        "ctx": "A dog runs across the field",
        "endings": ["to fetch the ball.", "and reads.", "quietly.", "with a hat."],
        "label": 2,
    },
]


@pytest.mark.slow
def test_final_line_matches_the_reference_accuracy(model, real_examples, real_reference, tmp_path, capsys, monkeypatch):
    ckpt = save_tiny_checkpoint(model, tmp_path / "model_00000.pt")
    acc_norm, acc = accuracies(real_reference[:20], real_examples[:20])
    line = f"hellaswag: acc_norm={acc_norm:.4f} acc={acc:.4f} n=20\n"
    # float32, as the reference: --dtype auto would score in bf16 on a CPU with native bf16
    args = ["--limit", "20", "--data-dir", str(HELLASWAG_DIR), "--batch-size", "6", "--device", "cpu"]
    args += ["--dtype", "float32"]
    r = run_script("hellaswag.py", "--checkpoint", str(ckpt), *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout == line and FINAL_LINE.fullmatch(r.stdout.strip())
    assert r.stderr == ""  # tqdm's bar stays silent when stderr is not a terminal

    # in-process, on a terminal: --model takes the .pt too; the bar is drawn on stderr, then wiped
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    hellaswag.main(["--model", str(ckpt), *args])
    assert capsys.readouterr().out == line
    err = terminal.getvalue()
    assert err.startswith("\rhellaswag:") and "/20 [" in err and "ex/s" in err
    assert "\n" not in err and err.endswith("\r")  # leave=False: the final line stands alone


def test_model_flag_takes_an_hf_folder(model, tmp_path, capsys):
    folder = tmp_path / "hf"
    model.save_pretrained(str(folder))
    hella = write_examples(tmp_path / "hella", TEXT_EXAMPLES)
    hellaswag.main(["--model", str(folder), "--data-dir", str(hella), "--device", "cpu", "--dtype", "float32"])
    # the folder holds the 50257 real tokens only: a model of its own, scored by hand
    exported = GPT.from_pretrained(str(folder)).eval()
    assert exported.config.vocab_size == train_gpt.GPT2_VOCAB
    enc = tokenizer.get_tokenizer()
    rendered = [hellaswag_eval.render_hellaswag(ex, enc) for ex in TEXT_EXAMPLES]
    acc_norm, acc = accuracies(hand_preds(exported, rendered), rendered)
    assert capsys.readouterr() == (f"hellaswag: acc_norm={acc_norm:.4f} acc={acc:.4f} n=3\n", "")


def test_unlabelled_examples_are_warned_about(model, tmp_path, capsys):
    unlabelled = [{k: v for k, v in ex.items() if k != "label"} for ex in TEXT_EXAMPLES]
    hella = write_examples(tmp_path / "hella", unlabelled, split="test")
    ckpt = save_tiny_checkpoint(model, tmp_path / "model_00000.pt")
    hellaswag.main(["--checkpoint", str(ckpt), "--split", "test", "--data-dir", str(hella), "--device", "cpu"])
    out, err = capsys.readouterr()
    assert out == "hellaswag: acc_norm=0.0000 acc=0.0000 n=3\n"
    assert err == "warning: 3 examples have no label; they count as wrong\n"


def test_examples_longer_than_the_model_are_one_error_line(tmp_path, capsys):
    torch.manual_seed(0)
    short = GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8))
    ckpt = save_tiny_checkpoint(short, tmp_path / "model_00000.pt")
    hella = write_examples(tmp_path / "hella", TEXT_EXAMPLES)
    longest = max(
        len(ctx) + len(end)
        for ctx, endings, _ in (hellaswag_eval.render_hellaswag(ex, tokenizer.get_tokenizer()) for ex in TEXT_EXAMPLES)
        for end in endings
    )
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--checkpoint", str(ckpt), "--data-dir", str(hella), "--device", "cpu"])
    assert e.value.code == 1
    assert capsys.readouterr() == (
        "",
        f"error: the longest example has {longest} tokens, more than the model's block_size 8\n",
    )


def test_missing_data_is_one_error_line(model, tmp_path, capsys, monkeypatch):
    for k, v in NO_NETWORK.items():
        monkeypatch.setenv(k, v)
    ckpt = save_tiny_checkpoint(model, tmp_path / "model_00000.pt")
    empty = tmp_path / "empty"
    with pytest.raises(SystemExit) as e:  # in-process: main() itself must turn the failure into one line
        hellaswag.main(["--checkpoint", str(ckpt), "--data-dir", str(empty), "--device", "cpu"])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"error: HellaSwag val data: {empty / 'hellaswag_val.jsonl'} is missing and ")
    assert not empty.exists()  # no folder made, no partial download left behind


def test_train_gpt_with_missing_hellaswag_fails_before_training(shards, tmp_path, capsys, monkeypatch):
    for k, v in NO_NETWORK.items():
        monkeypatch.setenv(k, v)
    empty = tmp_path / "empty"
    args = [*TINY, "--hellaswag-every", "10", "--hellaswag-dir", str(empty), "--data-dir", str(shards)]
    args += ["--log-dir", str(tmp_path / "log"), "--seq-len", "32", "--batch-size", "2", "--total-batch-size", "64"]
    with pytest.raises(SystemExit) as e:
        train_gpt.main([*args, "--max-steps", "3", "--device", "cpu"])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert not [line for line in out.splitlines() if line.startswith(("step ", "validation", "hellaswag"))]
    assert err.startswith(f"error: HellaSwag val data: {empty / 'hellaswag_val.jsonl'} is missing and ")
    assert err.count("\n") == 1
    # a data problem shows before the run takes its log dir (the lock, an emptied log.txt)
    assert not (tmp_path / "log").exists(), sorted(p.name for p in (tmp_path / "log").iterdir())


@pytest.mark.slow
def test_train_gpt_hellaswag_every_logs_the_scores_of_its_model(shards, tmp_path):
    hella = write_examples(tmp_path / "hella", TEXT_EXAMPLES)
    log = tmp_path / "log"
    args = [*TINY, "--hellaswag-every", "2", "--hellaswag-dir", str(hella), "--data-dir", str(shards)]
    args += ["--log-dir", str(log), "--seq-len", "32", "--batch-size", "2", "--total-batch-size", "64"]
    args += ["--max-steps", "3", "--eval-every", "0", "--device", "cpu", "--dtype", "float32"]  # as hand_preds
    r = run_script("train_gpt.py", *args, env=NO_NETWORK)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stdout.splitlines() if line.startswith("hellaswag:")]
    assert len(lines) == 3 and all(FINAL_LINE.fullmatch(line) and line.endswith(" n=3") for line in lines)
    hella_log = [line.split() for line in (log / "log.txt").read_text().splitlines() if " hella " in line]
    assert [int(step) for step, _, _ in hella_log] == [0, 2, 3]
    assert [float(x) for *_, x in hella_log] == [float(FINAL_LINE.fullmatch(line).group(1)) for line in lines]

    # the last score is that of the final checkpoint, recomputed by hand
    path = str(log / "model_00003.pt")
    final = train_gpt.model_from_checkpoint(checkpoint.load_checkpoint(path), path).eval()
    enc = tokenizer.get_tokenizer()
    rendered = [hellaswag_eval.render_hellaswag(ex, enc) for ex in TEXT_EXAMPLES]
    acc_norm, acc = accuracies(hand_preds(final, rendered), rendered)
    assert lines[-1] == f"hellaswag: acc_norm={acc_norm:.4f} acc={acc:.4f} n=3"


NEITHER = "pass exactly one of --checkpoint PATH or --model (a .pt, an HF GPT-2 folder or gpt2...)"


@pytest.mark.parametrize(
    "argv, error",
    [
        ([], NEITHER),
        (["--checkpoint", "x.pt", "--model", "gpt2"], NEITHER),
        (["--checkpoint", "no/such.pt"], "no/such.pt: no such checkpoint"),
        (["--model", "no/such.pt"], "no/such.pt: no such checkpoint"),
        (
            ["--checkpoint", "model.bin"],
            "--checkpoint model.bin: expected a .pt file of train_gpt.py; use --model for others",
        ),
        (
            ["--model", "gpt3"],
            "'gpt3' is not a .pt checkpoint, an HF GPT-2 folder or a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl)",
        ),
    ],
)
def test_bad_model_flags_are_one_error_line_before_any_data(argv, error, capsys, tmp_path, monkeypatch):
    for k, v in NO_NETWORK.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:  # the data folder is empty: the flag's error must come first
        hellaswag.main([*argv, "--data-dir", str(tmp_path), "--device", "cpu"])
    assert e.value.code == 1
    assert capsys.readouterr() == ("", f"error: {error}\n")
    assert os.listdir(tmp_path) == []


def test_not_a_checkpoint_is_one_error_line(capsys, tmp_path):
    hella = write_examples(tmp_path / "hella", TEXT_EXAMPLES[:1])
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(SystemExit) as e:
        hellaswag.main(["--checkpoint", str(tmp_path / "other.pt"), "--data-dir", str(hella), "--device", "cpu"])
    assert e.value.code == 1
    assert capsys.readouterr() == (
        "",
        f"error: {tmp_path / 'other.pt'}: not a train_gpt.py checkpoint (no model, config; a bare state dict?)\n",
    )
