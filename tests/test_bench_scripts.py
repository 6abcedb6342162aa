"""Benchmark scripts do what they say: bench/squad_cpu.sh runs the stages it is asked for (a
stand-in python records every stage's command line, so the script's own logic is checked in a
second), bench/calibration_variants.py reproduces the shipped decision's numbers."""

import importlib.util
import json
import math
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ragtune.answerability import AnswerFeatures, combine, fit_calibration
from ragtune.metrics import aggregate, score_answer
from ragtune.roc import auroc

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$RECORD"
case $1 in train/sft.py) sleep "${STAGE_SLEEP:-0}"; echo "done ${*: -1}" >> "$RECORD";; esac
for a in "$@"; do case $a in hydra.run.dir=*eval) mkdir -p "${a#*=}"; : > "${a#*=}/results.md";; esac; done
"""


def _stages(tmp_path: Path, modes: str | None, **extra_env: str) -> list[str]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "record.txt"
    env = {k: v for k, v in os.environ.items() if k not in ("MODES", "BASELINE_ALONGSIDE")}
    env.update(PYTHON=str(fake), RECORD=str(record), SQUAD="squad.json", **extra_env)
    if modes is not None:
        env["MODES"] = modes
    subprocess.run(
        ["bash", "bench/squad_cpu.sh", str(tmp_path / "b"), "0"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return record.read_text().splitlines()


@pytest.mark.parametrize(
    ("modes", "closed", "raft", "eval_modes"),
    [
        (None, True, True, None),
        ("raft_rag", False, True, "eval.modes=[raft_rag]"),
        ("base_rag raft_rag", False, True, "eval.modes=[base_rag,raft_rag]"),
        ("ft_then_rag raft_rag", True, True, "eval.modes=[ft_then_rag,raft_rag]"),
        ("ft_then_rag", True, False, "eval.modes=[ft_then_rag]"),
    ],
)
def test_squad_cpu_trains_each_model_only_for_the_modes_that_need_it(
    tmp_path: Path, modes: str | None, closed: bool, raft: bool, eval_modes: str | None
) -> None:
    calls = [c for c in _stages(tmp_path, modes) if not c.startswith("done ")]
    scripts = [c.split()[0] for c in calls]
    assert scripts[:2] == ["train/prepare_squad.py", "train/sft.py"]
    assert scripts[-1] == "train/eval.py"
    trained_closed = any("raft.mode=closed" in c for c in calls)
    trained_raft = any(c.endswith(f"hydra.run.dir={tmp_path / 'b'}/runs/raft") for c in calls)
    assert (trained_closed, trained_raft) == (closed, raft)
    evaluation = calls[-1].split()
    assert any(a.startswith("eval.models.ft_closed=") for a in evaluation) == closed
    assert any(a.startswith("eval.models.raft_rag=") for a in evaluation) == raft
    if eval_modes is None:
        assert not any(a.startswith("eval.modes=") for a in evaluation)
    else:
        assert eval_modes in evaluation


def _run_product_gpu(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "bench/squad_product_gpu.sh", "1"],
        cwd=ROOT,
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_squad_product_gpu_stops_at_once_on_a_fresh_machine(tmp_path: Path) -> None:
    """Without the setup calls' files (the machine went back between calls) the GPU script
    says so in one line and exits 3 before starting or converting anything."""
    out = tmp_path / "out"
    res = _run_product_gpu(
        SITE=str(tmp_path / "no-bundle"), OUT=str(out), SEEDS="0", SQP=str(tmp_path / "sqp")
    )
    assert res.returncode == 3
    assert "fresh machine" in res.stderr and "setup calls" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not res.stdout
    assert not out.exists()


FAKE_DF = """#!/usr/bin/env bash
# df -P -k: 100 GiB free less 24 GiB for each weight file under $SQP
n=$(find "$SQP" -name '*.safetensors' | wc -l)
avail=$(((100 - 24 * n) * 1048576))
printf 'Filesystem 1024-blocks Used Available Capacity Mounted\\nfake 1 1 %d 1%% /\\n' "$avail"
"""


def _run_with_a_full_disk(
    tmp_path: Path, seeds: str, gib_per_seed: int = 15
) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "df").write_text(FAKE_DF)
    (bin_dir / "df").chmod(0o755)
    return _run_product_gpu(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SQP=str(tmp_path / "sqp"),
        SITE=str(tmp_path / "no-bundle"),  # past the disk guard, stop at the fresh-machine check
        OUT=str(tmp_path / "out"),
        SEEDS=seeds,
        RECIPE="contrast",
        GIB_PER_SEED=str(gib_per_seed),
    )


def _a_finished_run(sqp: Path, name: str) -> Path:
    run = sqp / name
    for stage in ("raft", "closed"):
        (run / "runs" / stage / "model").mkdir(parents=True)
        (run / "runs" / stage / "model" / "model.safetensors").write_bytes(b"w" * 64)
        (run / "runs" / stage / "model" / "manifest.json").write_text("{}")
    (run / "runs" / "eval").mkdir()
    (run / "runs" / "eval" / "answers.jsonl").write_text("{}\n")
    (run / "started").touch()
    return run


def test_squad_product_gpu_frees_finished_runs_weights_before_starting_new_seeds(
    tmp_path: Path,
) -> None:
    """A second run on one machine filled its disk (session 25): before new seeds start, the runs
    no longer running lose their weights but keep what is collected (manifest, answers); a run
    still going keeps everything; a seed already started needs no room; still full: one line."""
    sqp = tmp_path / "sqp"
    done = _a_finished_run(sqp, "contrast_s0")
    going = _a_finished_run(sqp, "contrast_b32_s1")
    fake_stage = tmp_path / "bench" / "squad_cpu.sh"  # a run still going, as the script starts it
    fake_stage.parent.mkdir()
    fake_stage.write_text("sleep 60\n")
    proc = subprocess.Popen(["bash", str(fake_stage), str(going), "1"])
    try:
        # 4 GiB free, but seed 0 of contrast already started: nothing removed, on to the next check
        res = _run_with_a_full_disk(tmp_path, "0")
        assert res.returncode == 3 and (done / "runs/raft/model/model.safetensors").exists()

        res = _run_with_a_full_disk(tmp_path, "0 2")  # seed 2 is new and needs room
        assert res.returncode == 3, res.stderr  # room made; stopped at the fresh-machine check
        assert not list(done.rglob("*.safetensors"))
        assert (done / "runs/raft/model/manifest.json").exists()
        assert (done / "runs/eval/answers.jsonl").exists()
        assert (going / "runs/raft/model/model.safetensors").exists()
        assert (going / "runs/closed/model/model.safetensors").exists()
    finally:
        proc.kill()
        proc.wait()

    # 52 GiB free with the running run's weights (2 x 24 GiB) still there: not enough for a seed
    # of 60 GiB, so say so and start nothing
    proc = subprocess.Popen(["bash", str(fake_stage), str(going), "1"])
    try:
        res = _run_with_a_full_disk(tmp_path, "3", gib_per_seed=60)
    finally:
        proc.kill()
        proc.wait()
    assert res.returncode == 4
    assert len(res.stderr.strip().splitlines()) == 1 and "GiB free" in res.stderr
    assert not (sqp / "contrast_s3").exists()


@pytest.mark.parametrize("alongside", [False, True])
def test_squad_cpu_trains_the_closed_book_model_beside_the_co_designed_one_when_asked(
    tmp_path: Path, alongside: bool
) -> None:
    env = {"STAGE_SLEEP": "1"} | ({"BASELINE_ALONGSIDE": "1"} if alongside else {})
    calls = _stages(tmp_path, None, **env)
    raft_done = calls.index(f"done hydra.run.dir={tmp_path / 'b'}/runs/raft")
    closed_start = next(i for i, c in enumerate(calls) if "raft.mode=closed" in c)
    closed_done = calls.index(f"done hydra.run.dir={tmp_path / 'b'}/runs/closed")
    assert (closed_start < raft_done) == alongside
    # the evaluation waits for both models either way
    assert calls[-1].startswith("train/eval.py") and closed_done < len(calls) - 1


def _load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _answer_row(rng: random.Random, i: int, answerable: bool) -> dict:
    """An evaluation/calibration answer row; answerable questions abstain less likely."""
    p = min(0.95, max(0.05, rng.gauss(0.35 if answerable else 0.6, 0.2)))
    feats = AnswerFeatures(
        lp_answer=rng.gauss(-3, 1),
        n_answer=rng.randint(1, 6),
        lp_abstain=rng.gauss(-1, 0.5),
        p_abstain_first=p,
        grounded=float(rng.random() < 0.8),
        retrieval=rng.gauss(0.6, 0.1),
    )
    gold = [f"answer {i}"] if answerable else []
    cand = f"answer {i}" if rng.random() < 0.5 else "something else"  # mean F1 ~0.5: cut ~0.7
    f1 = score_answer(cand, gold).f1 if answerable else 0.0
    return {
        "mode": "raft_rag",
        "id": f"q{i}",
        "answerable": answerable,
        "gold": gold,
        "candidate": cand,
        "candidate_f1": f1,
        "features": feats.to_dict(),
        "_features": feats,
    }


def test_calibration_variants_reproduce_the_shipped_decision(tmp_path: Path) -> None:
    """bench/calibration_variants.py's "shipped" row is what the evaluation reports for the
    same answers: the decision fitted on the held-out answers, applied to the test ones, and
    scored by the SQuAD v2 rules (an abstention is the empty answer)."""
    rng = random.Random(0)
    cal = [_answer_row(rng, i, i % 2 == 0) for i in range(120)]
    test = [_answer_row(rng, i, i % 3 == 0) for i in range(90)]
    decision = fit_calibration(
        [r["_features"] for r in cal],
        [r["answerable"] for r in cal],
        [r["candidate_f1"] for r in cal],
    )
    scores = combine([r["_features"] for r in test], decision.weights, decision.bias)
    finals = [
        r["candidate"] if s >= decision.threshold else "" for r, s in zip(test, scores, strict=True)
    ]
    overall = aggregate([score_answer(a, r["gold"]) for a, r in zip(finals, test, strict=True)])
    for name, rows in (("cal.jsonl", cal), ("answers.jsonl", test)):
        lines = [json.dumps({k: v for k, v in r.items() if k != "_features"}) for r in rows]
        (tmp_path / name).write_text("\n".join(lines) + "\n")

    bench = _load_bench("calibration_variants")
    got = bench.compare(tmp_path / "cal.jsonl", tmp_path / "answers.jsonl")

    assert [g[0] for g in got] == ["shipped", *bench.VARIANTS]
    assert got[0][1] == pytest.approx(auroc(scores, [r["answerable"] for r in test]))
    assert got[0][2] == pytest.approx(overall.overall, abs=0.005)  # aggregate rounds to 0.01
    assert 0 < sum(1 for a in finals if a) < len(finals)  # the cut answers some, not all


def test_calibration_variants_read_the_judge_scores_of_each_split(tmp_path: Path) -> None:
    """``--judge`` puts bench/squad_judge.py's scores into the features of the split they were
    computed on: a judge that knows which questions are answerable separates the test
    questions perfectly, alone and in the mix."""
    rng = random.Random(1)
    cal = [_answer_row(rng, i, i % 2 == 0) for i in range(120)]
    test = [_answer_row(rng, i, i % 3 == 0) for i in range(90)]
    # the same ids in both splits, answerable differently: scores from the wrong split are noise
    judge = [
        {"id": r["id"], "split": split, "judge_base": 3.0 if r["answerable"] else -3.0}
        for split, rows in (("validation", cal), ("test", test))
        for r in rows
    ]
    for name, rows in (("cal.jsonl", cal), ("answers.jsonl", test), ("judge.jsonl", judge)):
        lines = [json.dumps({k: v for k, v in r.items() if k != "_features"}) for r in rows]
        (tmp_path / name).write_text("\n".join(lines) + "\n")

    bench = _load_bench("calibration_variants")
    got = {
        name: area
        for name, area, _ in bench.compare(
            tmp_path / "cal.jsonl", tmp_path / "answers.jsonl", judge=tmp_path / "judge.jsonl"
        )
    }
    assert got["judge_base alone"] == pytest.approx(1.0)
    assert got["shipped + judge_base"] == pytest.approx(1.0)
    assert got["shipped"] < 0.9
    assert "judge_tuned alone" not in got  # only the scores the file has


def test_squad_separation_counts_answers_that_took_the_plausible_bait(tmp_path: Path) -> None:
    """The error table: an answered unanswerable question whose answer is SQuAD v2's plausible
    answer counts as such, another answered one does not; an abstained answerable question
    counts its right candidate and its retrieval hit."""
    qas = [
        {
            "question": "Who won in 1999?",
            "is_impossible": True,
            "plausible_answers": [{"text": "the Red Team"}],
        },
        {
            "question": "Who lost in 1999?",
            "is_impossible": True,
            "plausible_answers": [{"text": "the Blue Team"}],
        },
    ]
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"paragraphs": [{"qas": qas}]}]}))
    rows = [
        {"question": "Who won in 1999?", "candidate": "Red Team", "abstained": False},
        {"question": "Who lost in 1999?", "candidate": "nobody", "abstained": False},
        {
            "question": "When?",
            "candidate": "in 2001",
            "abstained": True,
            "gold": ["2001"],
            "retrieval_hit": True,
        },
        {
            "question": "Where?",
            "candidate": "Paris",
            "abstained": True,
            "gold": ["Rome"],
            "retrieval_hit": False,
        },
    ]
    for r in rows:
        r.update(mode="raft_rag", answerable="gold" in r)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    bench = _load_bench("squad_separation")
    got = bench.errors(answers, bench.plausible_answers(squad))
    assert got == {
        "unanswerable": 2,
        "answered": 2,
        "answered_plausible": 1,
        "candidates_plausible": 1,
        "answerable": 2,
        "abstained": 2,
        "abstained_right": 1,
        "abstained_retrieved": 1,
    }


def test_plot_loss_splits_a_resumed_run_and_stops_at_the_preference_step(tmp_path: Path) -> None:
    """bench/plot_loss.py: the SFT's logged losses, a new line where a resume logs its steps
    again, and nothing of the preference step's trainer that logs after it."""
    plot_loss = _load_bench("plot_loss")

    def logged(epoch: float, loss: float) -> str:
        grad = 2 * loss + 1  # a grad norm of its own per log
        return f" 10%|#| 5/50 [00:01<00:09]{{'loss': '{loss}', 'grad_norm': '{grad}', 'epoch': '{epoch}'}}"

    lines = [logged(0.1, 3.0), logged(0.2, 0.5), logged(0.3, 11.2)]
    lines += ["[x][ragtune.training.recipe][WARNING] - training diverged at step 15; resuming"]
    lines += [logged(0.2, 0.5), logged(0.3, 11.2)]
    lines += ["[x][ragtune.training.preference][INFO] - preference step: 12 pairs {'oracle': 6}"]
    lines += [logged(0.5, 1.7)]
    lines += ["[x][ragtune.training.recipe][INFO] - trained 15 steps in 1.0 s, final loss 0.5"]
    log = tmp_path / "raft.log"
    log.write_text("\n".join(lines))
    assert plot_loss.segments(log) == [
        [(0.1, 3.0), (0.2, 0.5), (0.3, 11.2)],
        [(0.2, 0.5), (0.3, 11.2)],
    ]
    assert plot_loss.segments(log, metric="grad_norm") == [
        [(0.1, 7.0), (0.2, 2.0), (0.3, 23.4)],
        [(0.2, 2.0), (0.3, 23.4)],
    ]
    # as plotted: the first log is at step 5 (--every), so 0.02 epochs a step; or by epoch
    runs = plot_loss.segments(log)
    assert plot_loss.curves(runs, "step", every=5) == [
        [(5, 3.0), (10, 0.5), (15, 11.2)],
        [(10, 0.5), (15, 11.2)],
    ]
    assert plot_loss.curves(runs, "step", every=5, max_x=12) == [[(5, 3.0), (10, 0.5)], [(10, 0.5)]]
    assert plot_loss.curves(runs, "epoch", every=5, max_x=0.25) == [
        [(0.1, 3.0), (0.2, 0.5)],
        [(0.2, 0.5)],
    ]
    out = tmp_path / "loss.png"
    subprocess.run(
        [sys.executable, str(ROOT / "bench/plot_loss.py"), f"{log}:run", "--out", str(out)],
        check=True,
    )
    assert out.stat().st_size > 0
    grads = tmp_path / "grads.png"
    cmd = [sys.executable, str(ROOT / "bench/plot_loss.py"), f"{log}:run", "--out", str(grads)]
    subprocess.run(
        [*cmd, "--metric", "grad_norm", "--x", "epoch", "--max-step", "0.25"], check=True
    )
    assert grads.stat().st_size > 0


def test_plot_loss_reads_the_preference_step_alone_and_smooths_it(tmp_path: Path) -> None:
    plot_loss = _load_bench("plot_loss")

    def logged(epoch: float, loss: float) -> str:
        return f"{{'loss': '{loss}', 'grad_norm': '1.0', 'epoch': '{epoch}'}}"

    lines = [logged(0.1, 3.0), logged(0.2, 0.5)]
    lines += ["[x][ragtune.training.preference][INFO] - preference step: 12 pairs {'oracle': 6}"]
    lines += [logged(0.25, 0.9), logged(0.5, 0.1), logged(0.75, 0.5), logged(1.0, 2.0)]
    lines += ["[x][ragtune.training.preference][INFO] - preference step: 4 steps in 1.0 s"]
    lines += ["[x][ragtune.training.recipe][INFO] - trained 15 steps in 1.0 s, final loss 0.5"]
    log = tmp_path / "raft.log"
    log.write_text("\n".join(lines))
    pref = plot_loss.segments(log, "preference")
    assert pref == [[(0.25, 0.9), (0.5, 0.1), (0.75, 0.5), (1.0, 2.0)]]
    assert plot_loss.smoothed(pref[0], 3) == [(0.25, 0.9), (0.5, 0.5), (0.75, 0.5), (1.0, 0.5)]
    assert plot_loss.smoothed(pref[0], 1) == pref[0]


def test_calibration_variants_by_source_fit_on_the_other_articles(tmp_path: Path) -> None:
    """``--by-source`` scores each article's held-out answers with a mix fitted on the other
    articles only: where the abstain probability means the opposite in the two articles, the
    mix fitted on one ranks the other exactly backwards (AUROC 0; fitted on both it would be
    ~0.5, on the article itself 1). Gold answers come from the rows or from ``--gold``."""
    rng = random.Random(2)
    rows = []
    for i in range(160):
        source, answerable = ("a.txt", "b.txt")[i % 2], i % 4 < 2
        r = _answer_row(rng, i, answerable)
        flipped = answerable if source == "a.txt" else not answerable
        r["features"]["p_abstain_first"] = (0.2 if flipped else 0.8) + rng.uniform(-0.05, 0.05)
        r |= {"source": source}
        rows.append({k: v for k, v in r.items() if k != "_features"})
    (tmp_path / "cal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "one.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows if r["source"] == "a.txt")
    )
    bench = _load_bench("calibration_variants")

    got = bench.by_source(tmp_path / "cal.jsonl")
    assert {held for held, *_ in got} == {"a.txt", "b.txt"}
    alone = {held: area for held, name, area, _ in got if name == "logit p_abstain_first"}
    assert alone == {"a.txt": pytest.approx(0.0), "b.txt": pytest.approx(0.0)}
    assert bench.by_source(tmp_path / "one.jsonl") == []  # one article: nothing to hold out

    # rows written before they carried their gold: --gold (the split's training QA) supplies it
    (tmp_path / "old.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "gold"}) + "\n" for r in rows)
    )
    with pytest.raises(SystemExit, match="--gold"):
        bench.by_source(tmp_path / "old.jsonl")
    train = [  # prepare_squad.py's records: an unanswerable question has an empty output
        {
            "instruction": f"question {r['id']}",
            "output": r["gold"][0] if r["gold"] else "",
            "id": r["id"],
        }
        for r in rows
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(t) + "\n" for t in train))
    assert bench.by_source(tmp_path / "old.jsonl", tmp_path / "train.jsonl") == got


def _separation_run(path: Path, ids: list[str], source: str, scores: list[float]) -> Path:
    """A raft_rag answers.jsonl: even ids answerable (answered right), odd ones unanswerable
    (abstained), each with the given answerability score."""
    rows = []
    for i, (qid, s) in enumerate(zip(ids, scores, strict=True)):
        ans = i % 2 == 0
        rows.append(
            {
                "mode": "raft_rag",
                "id": qid,
                "source": source,
                "answerable": ans,
                "gold": ["x"] if ans else [],
                "candidate": "x",
                "abstained": not ans,
                "score": 1.0,
                "f1": 1.0 if ans else 0.0,
                "retrieval_hit": ans,
                "answerability": s,
                "features": {"margin": s},
            }
        )
    path.mkdir(parents=True)
    (path / "answers.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path / "answers.jsonl"


def test_squad_separation_sums_up_reruns_of_a_split(tmp_path: Path, capsys) -> None:
    """Runs over the same test questions are one split's row (mean and range of overall and
    AUROC, always-abstain's score there, the AUROC of the runs' mean score per question and how
    alike the runs score); a run over other questions is its own row; with no reruns there is
    no such table."""
    bench = _load_bench("squad_separation")
    a = ["q1", "q2", "q3", "q4"]
    run1 = _separation_run(tmp_path / "r1", a, "squad/Alpha.txt", [0.9, 0.1, 0.8, 0.2])  # AUROC 1
    run2 = _separation_run(tmp_path / "r2", a, "squad/Alpha.txt", [0.9, 0.8, 0.1, 0.2])  # 0.5
    other = _separation_run(tmp_path / "r3", ["q5", "q6"], "squad/Beta.txt", [0.2, 0.9])  # 0

    stats = {p: bench.separation(p) for p in (run1, run2, other)}
    got = bench.by_split(stats)
    assert [g["articles"] for g in got] == [["Alpha"], ["Beta"]]
    assert got[0]["auroc"] == pytest.approx([1.0, 0.5]) and got[1]["auroc"] == [0.0]
    assert got[0]["always_abstain"] == pytest.approx(50.0)
    assert got[0]["overall"] == pytest.approx([100.0, 100.0])
    # per question mean 0.9 / 0.45 / 0.45 / 0.2 (q1, q3 answerable): 3.5 of 4 pairs in order
    assert got[0]["auroc_of_mean"] == pytest.approx(0.875)
    assert got[0]["correlation"] == pytest.approx(0.02)  # 0.01 / sqrt(0.5 * 0.5)
    assert math.isnan(got[1]["correlation"]) and got[1]["auroc_of_mean"] == 0.0

    assert bench.main([str(run1), str(run2), str(other)]) == 0
    out = capsys.readouterr().out
    assert "| Alpha | 2 | 50.0 | 100.0 (100.0-100.0) | 0.750 (0.500-1.000) | 0.875 | 0.02 |" in out
    assert "| Beta | 1 |" in out
    assert bench.main([str(run1), str(other)]) == 0
    assert "test articles" not in capsys.readouterr().out


def test_squad_separation_draws_each_runs_roc(tmp_path: Path, monkeypatch) -> None:
    """--roc: one curve per run, named by its folder, from that run's own scores and labels;
    the picture is written."""
    bench = _load_bench("squad_separation")
    a = ["q1", "q2", "q3", "q4"]
    run1 = _separation_run(tmp_path / "r1", a, "squad/Alpha.txt", [0.9, 0.1, 0.8, 0.2])
    run2 = _separation_run(tmp_path / "r2", a, "squad/Alpha.txt", [0.9, 0.8, 0.1, 0.2])
    drawn = {}
    plot = bench.plot_roc
    monkeypatch.setattr(
        bench, "plot_roc", lambda curves, path: drawn.update(curves) or plot(curves, path)
    )

    picture = tmp_path / "roc.png"
    assert bench.main([str(run1), str(run2), "--roc", str(picture)]) == 0
    assert list(drawn) == ["r1", "r2"]
    for name, scores in (("r1", [0.9, 0.1, 0.8, 0.2]), ("r2", [0.9, 0.8, 0.1, 0.2])):
        got_scores, labels = drawn[name]
        assert sorted(got_scores) == sorted(scores) and sum(labels) == 2
    assert auroc(*drawn["r1"]) == pytest.approx(1.0) and auroc(*drawn["r2"]) == pytest.approx(0.5)
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_spike_probe_finds_the_rows_each_training_step_trains_on(tiny_lm_path: str) -> None:
    """The order bench/spike_probe.py reports is the one a training run of ragtune's Trainer
    consumes: rows recorded from a real run's first steps, seeded alike, match it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from ragtune.schema import get_schema
    from ragtune.training.data import tokenize_examples
    from ragtune.training.trainer import trainer_class

    probe = _load_bench("spike_probe")
    examples = [
        {"prompt": f"What is item {i}?" + " context" * (i % 5), "completion": f"item {i}"}
        for i in range(20)
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    schema = get_schema("alpaca_rag_short")
    order = probe.batch_order(examples, tokenizer, schema, 256, seed=3, batch=4, epochs=2)
    assert len(order) == 10
    assert sorted(sum(order[:5], [])) == sorted(sum(order[5:], [])) == list(range(20))
    assert probe.batch_order(examples, tokenizer, schema, 256, seed=4, batch=4) != order[:5]

    dataset, _ = tokenize_examples(examples, tokenizer, schema, 256)
    key = {tuple(ids): i for i, ids in enumerate(dataset["input_ids"])}
    seen: list[list[int]] = []

    class Recording(trainer_class()):
        def training_step(self, model, inputs, *args, **kwargs):  # noqa: ANN001
            seen.append(probe.rows_of(inputs, key))
            return super().training_step(model, inputs, *args, **kwargs)

    args = SFTConfig(
        output_dir=str(Path(tiny_lm_path).parent / "probe_run"),
        per_device_train_batch_size=4,
        max_steps=7,  # into the second epoch: its reshuffle too
        seed=3,
        data_seed=3,
        use_cpu=True,
        completion_only_loss=True,
        max_length=256,
        report_to=[],
        save_strategy="no",
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_path)
    Recording(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    assert seen == order[:7]


def test_spike_probe_splits_a_batch_gradient_into_its_examples(tiny_lm_path: str) -> None:
    """The per-example gradients add up to the gradient of the Trainer's own loss on the batch
    (completion tokens only, divided by the batch's completion tokens)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from ragtune.schema import get_schema
    from ragtune.training.data import tokenize_examples
    from ragtune.training.trainer import trainer_class

    probe = _load_bench("spike_probe")
    examples = [
        {"prompt": f"Where is item {i}?" + " near" * i, "completion": "shelf " * (1 + i % 3)}
        for i in range(8)
    ]
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    schema = get_schema("alpaca_rag_short")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_path), lora)
    with torch.no_grad():  # B starts at zero: give the LoRA a state whose gradients all flow
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    dataset, _ = tokenize_examples(examples, tokenizer, schema, 256)
    key = {tuple(ids): i for i, ids in enumerate(dataset["input_ids"])}
    args = SFTConfig(
        output_dir=str(Path(tiny_lm_path).parent / "probe_grads"),
        per_device_train_batch_size=4,
        use_cpu=True,
        completion_only_loss=True,
        max_length=256,
        report_to=[],
    )
    trainer = trainer_class()(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    rows = probe.rows_of(batch, key)
    found, batch_norm = probe.example_gradients(model, tokenizer, schema, examples, rows, False)

    model.zero_grad()
    tokens = int((batch["labels"][:, 1:] != -100).sum())  # the completion tokens
    trainer.compute_loss(model, batch, num_items_in_batch=tokens).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    expected = torch.sqrt(sum((g**2).sum() for g in grads)).item()
    assert batch_norm == pytest.approx(expected, rel=1e-4)
    assert len(found) == 4 and all(e["grad_norm"] > 0 for e in found)
    assert batch_norm < sum(
        e["grad_norm"] for e in found
    )  # parts of one vector, not a sum of norms


def test_spike_probe_measures_on_the_line_between_two_saves(tiny_lm_path: str, tmp_path) -> None:
    """`grads --toward` sets the LoRA a share of the way from one save to the next: the ends
    are the two saves themselves (their gradients, not just their weights), the middle is the
    average, and the base weights never move."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ragtune.schema import get_schema

    probe = _load_bench("spike_probe")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_path)
    schema = get_schema("alpaca_rag_short")
    examples = [{"prompt": f"Where is item {i}?", "completion": "shelf"} for i in range(2)]
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_path), lora)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    saves = []
    for seed in (0, 1):  # two LoRA states, saved as save-at saves them
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.3)
        path = tmp_path / f"w{seed}.pt"
        torch.save({k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}, path)
        saves.append(path)

    def norm_at(weights: Path) -> float:
        probe.load_lora(model, str(weights))
        return probe.example_gradients(model, tokenizer, schema, examples, [0, 1], False)[1]

    expected = [norm_at(saves[0]), norm_at(saves[1])]
    assert expected[0] != pytest.approx(expected[1])
    probe.load_lora(model, str(saves[0]))
    start = probe.lora_state(model)
    probe.load_lora(model, str(saves[1]))
    end = probe.lora_state(model)
    measured = []
    for share in (0.0, 1.0):
        probe.move_between(model, start, end, share)
        measured.append(probe.example_gradients(model, tokenizer, schema, examples, [0, 1], False))
    assert [m[1] for m in measured] == pytest.approx(expected, rel=1e-5)
    probe.move_between(model, start, end, 0.5)
    for n, p in model.named_parameters():
        if n in start:
            assert torch.allclose(p, (start[n] + end[n]) / 2, atol=1e-6)
        else:
            assert torch.equal(p, base[n])


def test_squad_cpu_with_a_preset_trains_and_evaluates_as_the_preset_does(tmp_path: Path) -> None:
    """CONF=qwen_rag bench/squad_cpu.sh measures the preset as users run it: every training
    step composes to conf=qwen_rag's own train, raft, model and retriever settings (none of the
    CPU recipe's keys override them), the evaluation runs with the preset too, and the split
    keeps every training question. The GPU benchmark's contrast recipe is that preset."""
    import re

    from omegaconf import OmegaConf

    from ragtune.config import compose

    calls = [c for c in _stages(tmp_path, None, CONF="qwen_rag") if not c.startswith("done ")]
    prepare, *sft, evaluation = (c.split() for c in calls)
    assert prepare[prepare.index("--max-train") + 1] == "0"
    assert len(sft) == 2 and all(c[0] == "train/sft.py" for c in sft)

    preset = compose("sft", ["conf=qwen_rag"])
    for c in sft:
        bench = compose("sft", c[1:])
        closed = "raft.mode=closed" in c
        for group in ("train", "raft", "model", "retriever", "prompt", "eval"):
            got, want = (OmegaConf.to_container(x[group]) for x in (bench, preset))
            if group == "retriever":  # the split's own index
                assert got.pop("persist_dir").startswith(str(tmp_path))
                want.pop("persist_dir")
            if group == "raft" and closed:
                assert got.pop("mode") == "closed"
                want.pop("mode")
            assert got == want, (group, c)

    assert evaluation[0] == "train/eval.py" and "conf=qwen_rag" in evaluation
    bench_eval = compose("eval", evaluation[1:])
    preset_eval = compose("eval", ["conf=qwen_rag"])
    for group in ("model", "prompt", "eval"):
        got, want = (OmegaConf.to_container(x[group]) for x in (bench_eval, preset_eval))
        if group == "eval":  # the models under test
            models, base = got.pop("models"), want.pop("models")
            assert models == base | {
                "raft_rag": models["raft_rag"],
                "ft_closed": models["ft_closed"],
            }
        assert got == want, group
    assert bench_eval.retriever.hybrid is True

    gpu = (ROOT / "bench" / "squad_product_gpu.sh").read_text()
    contrast = re.search(r"^  contrast\)(.*?);;", gpu, re.S | re.M).group(1)
    assert re.search(r"\bCONF=qwen_rag\b", contrast) and not re.search(
        r"\b(train|raft)\.", contrast
    )


def test_squad_cpu_keeps_its_own_recipe_without_a_preset(tmp_path: Path) -> None:
    calls = [c for c in _stages(tmp_path, None) if not c.startswith("done ")]
    prepare, raft = calls[0].split(), calls[1].split()
    assert prepare[prepare.index("--max-train") + 1] == "720"
    assert not any(a.startswith("conf=") for c in calls for a in c.split())
    assert {"train.learning_rate=5e-4", "raft.unanswerable_fraction=0.33"} <= set(raft)


def test_decision_features_decides_as_the_pipeline_does(tmp_path: Path) -> None:
    """bench/decision_features.py refits a run's decision on a feature set and applies it as the
    pipeline does: a candidate that is itself the abstain answer abstains whatever its score,
    so a run's own feature set gives what its evaluation reported."""
    from ragtune.answerability import is_abstained
    from ragtune.schema import get_schema

    rng = random.Random(1)
    cal = [_answer_row(rng, i, i % 2 == 0) for i in range(120)]
    test = [_answer_row(rng, i, i % 3 == 0) for i in range(90)]
    sure = AnswerFeatures(-1.0, 2, -5.0, 0.01, 1.0, 0.9)  # scored far above any cut
    for r in test[1:9]:
        if not r["answerable"]:  # unanswerable: its right answer is to abstain
            r.update(candidate="I dont know", features=sure.to_dict(), _features=sure)
    for r in test:
        r["source"] = f"doc{int(r['id'][1:]) % 2}.txt"
    schema = get_schema("alpaca_rag_short")
    names = ["abstain_logodds", "retrieval"]
    decision = fit_calibration(
        [r["_features"] for r in cal],
        [r["answerable"] for r in cal],
        [r["candidate_f1"] for r in cal],
        names=names,
    )
    stands = decision.answers([r["_features"] for r in test])
    finals = [
        r["candidate"] if ok and not is_abstained(schema, r["candidate"]) else ""
        for r, ok in zip(test, stands, strict=True)
    ]
    expected = aggregate([score_answer(a, r["gold"]) for a, r in zip(finals, test, strict=True)])
    (tmp_path / "calibration").mkdir()
    for name, rows in (("calibration/answers.jsonl", cal), ("answers.jsonl", test)):
        lines = [json.dumps({k: v for k, v in r.items() if k != "_features"}) for r in rows]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    (tmp_path / "raft_manifest.json").write_text('{"prompt": {"name": "alpaca_rag_short"}}')

    bench = _load_bench("decision_features")
    got = bench.decide(
        bench.read_rows(tmp_path / "calibration/answers.jsonl"),
        bench.read_rows(tmp_path / "answers.jsonl"),
        names,
        schema,
    )
    assert sum(1 for r in test if r["candidate"] == "I dont know") >= 3  # precondition
    assert got["overall"] == pytest.approx(expected.overall, abs=0.005)
    assert got["abstain_unans"] == pytest.approx(expected.unanswerable_abstention_rate)
    assert got["auroc"] == pytest.approx(
        auroc(
            combine([r["_features"] for r in test], decision.weights, decision.bias),
            [r["answerable"] for r in test],
        )
    )
    assert set(got["by_article"]) == {"doc0", "doc1"}
    out = subprocess.run(
        [
            sys.executable,
            "bench/decision_features.py",
            str(tmp_path),
            "--features",
            "abstain_logodds,retrieval",
            "margin",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert out.count(f"| {tmp_path.name} |") == 2 and f"| {expected.overall:.1f} |" in out


def test_refit_calibration_sets_keys_and_the_copy_serves_with_the_retriever_ones(
    tmp_path: Path, monkeypatch
) -> None:
    """bench/refit_calibration.py --set changes the run's settings for the refit, and a
    retriever key also lands in the copy's manifest (so the copy is evaluated and served with
    the setting its decision was fitted under); the run's own model folder is left as it is."""
    from omegaconf import OmegaConf

    from ragtune.answerability import Calibration

    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "model").mkdir()
    OmegaConf.save(
        OmegaConf.create(
            {
                "prompt": {"name": "alpaca_rag_short"},
                "retriever": {"k": 3, "reader_rerank": 0},
                "raft": {"calibration_features": ["abstain_logodds", "retrieval"]},
            }
        ),
        run / ".hydra" / "config.yaml",
    )
    manifest = {"format": 1, "retriever": {"k": 3, "reader_rerank": 0, "chunk_size": 300}}
    (run / "model" / "manifest.json").write_text(json.dumps(manifest))
    bench = _load_bench("refit_calibration")
    seen: dict = {}

    def calibrate(cfg, schema, model_dir, retriever, run_dir):
        seen.update(cfg=cfg, model_dir=model_dir, run_dir=run_dir)
        return Calibration(threshold=0.5, weights={"abstain_logodds": -1.0})

    monkeypatch.setattr(bench, "calibrate", calibrate)
    monkeypatch.setattr(bench, "open_retriever", lambda cfg, tok, ingest_corpus: object())
    monkeypatch.setattr(bench, "load_tokenizer", lambda cfg: object())
    copy = tmp_path / "copy"
    features = "raft.calibration_features=[abstain_logodds,retrieval,abstain_logodds_chunk]"
    monkeypatch.setattr(
        sys,
        "argv",
        ["refit", str(run), str(copy), "--set", "retriever.reader_rerank=6", "--set", features],
    )
    bench.main()

    assert seen["cfg"].retriever.reader_rerank == 6 and seen["cfg"].retriever.k == 3
    assert list(seen["cfg"].raft.calibration_features)[-1] == "abstain_logodds_chunk"
    assert (seen["model_dir"], seen["run_dir"]) == (copy, run)
    written = json.loads((copy / "manifest.json").read_text())
    assert written["retriever"] == {"k": 3, "reader_rerank": 6, "chunk_size": 300}
    assert written["answerability"]["threshold"] == 0.5
    assert json.loads((run / "model" / "manifest.json").read_text()) == manifest


def test_hnsw_search_counts_misses_and_build_differences(tmp_path: Path, monkeypatch) -> None:
    """bench/hnsw_search.py through the real ingest: a small corpus is searched exactly and
    rebuilds alike; a search that returns a wrong chunk for one question is one miss per build,
    and a build that differs from the first is counted as a difference."""
    bench = _load_bench("hnsw_search")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(["The loom weaves glass.", "Herons eat fish.", "Ferries cross."]):
        (corpus / f"d{i}.md").write_text(text, encoding="utf-8")
    questions = ["What does the loom weave?", "What do herons eat?"]
    row = bench.measure(corpus, questions, ef_search=400, builds=2, fetch_k=2)
    assert row["missing_an_exact_neighbour"] == [0, 0] and row["differing_between_builds"] == [0]

    real, calls = bench.fetched, []

    def approximate(ret, queries, n):  # the second build's first question gets a wrong chunk
        sets, secs = real(ret, queries, n)
        calls.append(1)
        if len(calls) == 2:
            sets[0] = frozenset({"not-a-chunk", *list(sets[0])[1:]})
        return sets, secs

    monkeypatch.setattr(bench, "fetched", approximate)
    row = bench.measure(corpus, questions, ef_search=400, builds=2, fetch_k=2)
    assert row["missing_an_exact_neighbour"] == [0, 1] and row["differing_between_builds"] == [1]
