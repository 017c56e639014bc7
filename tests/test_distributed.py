"""Two CPU processes (torchrun, accelerate launch; gloo) give the same predictions and summed stats as one."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_pair import synthetic_pairs

from bild.bench import distributed
from bild.bench.bench_config import load_config
from bild.bench.report import write_results
from bild.bench.running import run_bench
from bild.stats import BildStats

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "eval_with_trainer.py"
PREFIX = "Translate to English: "
N_EXAMPLES = 5  # batches of 2: [0, 1], [2, 3], [4]; the Trainer pads the last step with a repeated example
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "de-en.jsonl"
    rows = [
        {"id": f"ex{i}", "source": de, "reference": en}
        for i, (de, en) in enumerate(synthetic_pairs(N_EXAMPLES, seed=5))
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(launcher: str, args: list[str], home: Path) -> subprocess.CompletedProcess:
    """``args`` on 2 CPU processes (gloo) in a clean, offline environment; ``launcher``: accelerate | torchrun.

    accelerate 1.15 starts several CPU processes only through its torchrun path (``--multi_gpu``); its
    ``--cpu --num_processes 2`` starts one process unless MPI is set up.
    """
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV and not k.startswith("ACCELERATE_")}
    env.update(
        CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HOME=str(home), HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
    )  # fmt: skip
    for _ in range(2):  # a free port can be taken between our check and the launcher's bind: retry once
        port = str(free_port())
        if launcher == "accelerate":
            command = [
                sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port,
            ]  # fmt: skip
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]  # fmt: skip
        done = subprocess.run([*command, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        if done.returncode == 0 or not _is_launch_failure(done):
            break
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _is_launch_failure(done: subprocess.CompletedProcess) -> bool:
    """Whether the process group never formed (a port or rendezvous problem), as opposed to a failing run."""
    text = done.stdout + done.stderr
    return any(sign in text for sign in ("Address already in use", "EADDRINUSE", "RendezvousConnectionError",
                                          "Connection refused", "DistNetworkError", "Connection reset"))  # fmt: skip


def write_config(folder: Path, pair, data_file: Path) -> Path:
    config = {
        "task": "translation", "data": str(data_file), "small": str(pair.small), "large": str(pair.large),
        "device": "cpu", "dtype": "float32", "batch_size": 2, "max_new_tokens": 16, "chat": True,
        "prefix": PREFIX, "limit": N_EXAMPLES, "threads": 1,
        "methods": [
            "large",  # (stock assisted generation is left out: its processes' equality is transformers' to keep)
            {"name": "bild", "fallback_threshold": 0.5, "rollback_threshold": 2.0, "max_draft_tokens": 4},
            {"name": "bild", "fallback_threshold": 0.5, "rollback_threshold": 0.0, "label": "bild-lossless"},
        ],
    }  # fmt: skip
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def bench_main(config_file: str, out_dir: str) -> None:
    """What ``bild bench`` does in each launched process: the main process alone writes the merged results."""
    results = run_bench(load_config(Path(config_file)), progress=False, config_file=config_file)
    assert (results is None) == (not distributed.is_main_process())
    if results is not None:
        write_results(results, out_dir)


def comparable(results: dict) -> dict:
    """The parts of bench results that must not depend on the number of processes (no timings)."""
    counts = ("n_examples", "n_tokens", "large_forwards", "small_forwards", "quality", "scores", "exact_match_large",
              "prefix_agreement_large", "bild")  # fmt: skip
    methods = {
        label: {key: summary.get(key) for key in counts} for label, summary in results["methods"].items()
    }
    return {"methods": methods, "examples": results["examples"]}


def test_bench_on_two_processes_equals_one(tiny_pair, data_file, tmp_path):
    config_file = write_config(tmp_path, tiny_pair, data_file)
    alone = run_bench(load_config(config_file), progress=False, config_file=str(config_file))
    launch("torchrun", [__file__, "bench", str(config_file), str(tmp_path / "two")], tmp_path / "home")
    together = json.loads((tmp_path / "two" / "results.json").read_text(encoding="utf-8"))

    assert together["environment"]["processes"] == 2 and alone["environment"]["processes"] == 1
    (added,) = [note for note in together["notes"] if note not in alone["notes"]]
    assert "2 processes" in added and "sum" in added
    assert len(together["examples"]) == N_EXAMPLES
    assert comparable(together) == json.loads(json.dumps(comparable(alone)))
    bild_summary = together["methods"]["bild(0.5, 2, 4)"]["bild"]
    assert bild_summary["fallbacks"] > 0 and bild_summary["large_forwards"] > 0


def test_trainer_evaluation_on_two_processes_equals_one(tiny_pair, data_file, tmp_path):
    spec = importlib.util.spec_from_file_location("eval_with_trainer_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [
        "--task", "translation", "--data", str(data_file), "--small", str(tiny_pair.small), "--large",
        str(tiny_pair.large), "--limit", str(N_EXAMPLES), "--batch-size", "2", "--max-new-tokens", "16",
        "--prefix", PREFIX, "--rollback", "2", "--fallback", "0.5", "--dtype", "float32",
    ]  # fmt: skip
    alone = script.main([*argv, "--out", str(tmp_path / "one")])
    done = launch("accelerate", [str(SCRIPT), *argv, "--out", str(tmp_path / "two")], tmp_path / "home")
    together = json.loads((tmp_path / "two" / "metrics.json").read_text(encoding="utf-8"))

    assert done.stdout.count('"processes": 2') == 1  # only the main process prints
    assert together["processes"] == 2 and alone["processes"] == 1 and together["examples"] == N_EXAMPLES
    timings = ("wall_s", "tokens_per_s", "processes")
    assert {k: v for k, v in together.items() if k not in timings} == {
        k: v for k, v in json.loads(json.dumps(alone)).items() if k not in timings
    }
    assert together["bild_generated"] > 0 and together["bild_fallbacks"] > 0
    predictions = [
        (path / "predictions.jsonl").read_text(encoding="utf-8")
        for path in (tmp_path / "one", tmp_path / "two")
    ]
    assert predictions[0] == predictions[1]
    assert [json.loads(line)["id"] for line in predictions[1].splitlines()] == [
        f"ex{i}" for i in range(N_EXAMPLES)
    ]


def test_shares_are_contiguous_and_cover_everything(monkeypatch):
    items = list(range(7))
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "process_index", lambda rank=rank: rank)
        monkeypatch.setattr(distributed, "num_processes", lambda: 3)
        shares.append(distributed.shard(items))
    assert shares == [[0, 1], [2, 3], [4, 5, 6]]


def test_trainer_stats_follow_the_dataset_and_drop_the_repeats(monkeypatch):
    """5 rows, batches of 2, 2 processes: process 0 decodes [0, 1], [4, 0]; process 1 [2, 3], [1, 2]."""

    def stats(*rows):
        return BildStats(**{name: list(rows) for name in BildStats.names()})

    shares = [[stats(0, 1), stats(4, 0)], [stats(2, 3), stats(1, 2)]]
    monkeypatch.setattr(distributed, "gather", lambda calls: shares)
    assert distributed.gather_trainer_stats([], 5).generated == [0, 1, 2, 3, 4]
    monkeypatch.setattr(distributed, "gather", lambda calls: [shares[0], shares[1][:1]])
    with pytest.raises(ValueError, match="even_batches"):
        distributed.gather_trainer_stats([], 5)


if __name__ == "__main__" and sys.argv[1] == "bench":
    bench_main(sys.argv[2], sys.argv[3])
