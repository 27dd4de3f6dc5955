"""Experiments end to end: every shipped config runs, compare shows what the issue asks,
records agree with the library, run directories, sweeps on every executor."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mmuemu
from mmuemu import experiment
from mmuemu.cli import main
from mmuemu.config import load_config, to_dict
from mmuemu.workload import populated

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))

#: overrides that make each shipped config small enough for the test suite
SMALL = {
    "arch-compare": ["processes.parent.regions.heap.size=16MiB"],
    "fork-folio-sizes": ["processes.parent.regions.heap.size=8MiB",
                         'sweep."processes.parent.folio_orders"=[[0], [4], [9]]'],
    "fork-under-load": ["processes.parent.regions.heap.size=16MiB", "experiment.forks=2",
                        'compare.across."machine.preempt"=["none", "lazy"]', "tasks.co-runner.program.0.times=8",
                        "tasks.writer.program.0.times=3", "tasks.reclaim.program.0.times=2"],
    "fork-elf": ["processes.app.regions.arena.size=8MiB"],
    "fork-smaps": [],
}


def _sets(name: str) -> list[str]:
    return [a for s in SMALL.get(name, []) for a in ("--set", s)]


def test_every_config_has_small_overrides() -> None:
    assert CONFIGS
    assert {c.stem for c in CONFIGS} == set(SMALL), "add the new config to SMALL"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_config_runs(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    declared = load_config(config).compare
    cmd = "compare" if declared.variants or declared.across else "run"
    rc = main([cmd, str(config), *_sets(config.stem), "--out", str(tmp_path), "--no-plots"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    with (tmp_path / "records.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["family"] for r in rows)
    assert any(float(r["time_ns"]) > 0 for r in rows if r["family"] == "fork")
    assert f"-> {tmp_path}" in out.out


def test_compare_shows_times_speedups_unfolds_and_tlbis(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ROOT / "configs" / "arch-compare.toml"
    assert main(["compare", str(cfg), *_sets("arch-compare"), "--out", str(tmp_path), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "fork: median" in text and "munmap: median" in text
    with (tmp_path / "compare.csv").open() as f:
        rows = {(r["point"], r["variant"], r["family"]): r for r in csv.DictReader(f)}
    for folio in ("4K", "16K", "64K", "2M"):
        for variant in ("x86_64", "arm64", "arm64+contpte"):
            for fam in ("fork", "munmap"):
                r = rows[(folio, variant, fam)]
                for col in ("time_ns batched", "time_ns legacy", "speedup", "contpte_unfolds batched",
                            "contpte_unfolds legacy", "tlbi_ops batched", "tlbi_ops legacy"):
                    assert r[col] != "", (folio, variant, fam, col)
                ratio = float(r["time_ns legacy"]) / float(r["time_ns batched"])
                assert float(r["speedup"]) == pytest.approx(ratio)
    blocks = (16 << 20) // (64 << 10)
    c64 = rows[("64K", "arm64+contpte", "fork")]
    assert float(c64["contpte_unfolds legacy"]) == blocks and float(c64["contpte_unfolds batched"]) == 0
    assert float(c64["tlbi_ops legacy"]) > 16 * blocks
    assert float(rows[("4K", "x86_64", "fork")]["speedup"]) == pytest.approx(1.0, abs=0.03)
    assert float(rows[("2M", "x86_64", "fork")]["speedup"]) > 1.3
    assert float(rows[("2M", "x86_64", "munmap")]["speedup"]) > 2.0


def test_compare_across_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "plain.toml"
    cfg.write_text('[processes.parent]\nfolio_orders = [4]\n[processes.parent.regions.heap]\nsize = "4MiB"\n')
    rc = main(["compare", str(cfg), "--across", "machine.arch=x86_64,arm64", "--across",
               "machine.fork_mode=batched,legacy", "--out", str(tmp_path / "out"), "--no-plots"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "x86_64 batched" in text or "ms x86_64 batched" in text
    rows = json.loads((tmp_path / "out" / "records.json").read_text())
    assert {(r["arch"], r["fork_mode"]) for r in rows} == {(a, m) for a in ("x86_64", "arm64")
                                                           for m in ("batched", "legacy")}


def test_records_agree_with_the_library() -> None:
    cfg = load_config({"machine": {"memory": "256MiB"},
                       "processes": {"parent": {"folio_orders": [4], "regions": {"heap": {"size": "8MiB"}}}},
                       "experiment": {"then_munmap": True}})
    res = experiment.run(cfg)
    fork = next(r for r in res.records if r["family"] == "fork")
    m = mmuemu.Machine(arch="x86_64", memory="256MiB")
    p, _ = populated(m, 8 << 20, 4, pte_mapped=False)
    with m.measure() as t:
        p.fork()
    assert fork["time_ns"] == t.ns
    for name, value in t.counts.items():
        assert fork[name] == value, name
    assert fork["folio_kib"] == 64 and fork["size_bytes"] == 8 << 20


def test_run_directory(tmp_path: Path) -> None:
    cfg = ROOT / "configs" / "arch-compare.toml"
    assert main(["compare", str(cfg), *_sets("arch-compare"), "--set", 'sweep."processes.parent.folio_orders"=[[4]]',
                 "--out", str(tmp_path), "--quiet", "--no-plots"]) == 0
    for name in ("config.toml", "config.json", "meta.json", "records.csv", "records.json", "summary.txt",
                 "compare.txt", "compare.csv", "points.json"):
        assert (tmp_path / name).is_file(), name
    resolved = load_config(tmp_path / "config.toml")
    assert to_dict(resolved) | {"name": ""} == to_dict(load_config(cfg, SMALL["arch-compare"] + [
        'sweep."processes.parent.folio_orders"=[[4]]'])) | {"name": ""}
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["mmuemu"] == mmuemu.__version__ and meta["points"] == 6
    assert "wrprotect_ptes" in meta["machines"]["arm64+contpte"]["overridden_helpers"]
    assert "wrprotect_ptes" not in meta["machines"]["x86_64"]["overridden_helpers"]
    records = json.loads((tmp_path / "records.json").read_text())
    with (tmp_path / "records.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(records) == 6 * 3


def _sweep_config() -> mmuemu.config.Config:
    return load_config(ROOT / "configs" / "fork-under-load.toml", SMALL["fork-under-load"] + [
        "processes.parent.regions.heap.size=8MiB", 'sweep."machine.preempt"=["none", "lazy"]',
        "output.trace=false", "output.plots=false"])


def _strip(records: list[dict]) -> list[dict]:
    return sorted(json.dumps(r, sort_keys=True, default=str) for r in records)


def test_sweep_is_the_same_on_every_local_executor() -> None:
    cfg = _sweep_config()
    one = experiment.run(cfg, jobs=1).records
    two = experiment.run(cfg, jobs=2).records
    assert len(one) > 10 and _strip(one) == _strip(two)
    lat = [r for r in one if r["family"] == "latency" and r["task"] == "co-runner"]
    assert len(lat) == 2 * 2  # per preemption model and fork mode


def test_sweep_on_dask_gives_the_same_records() -> None:
    pytest.importorskip("dask.distributed")
    cfg = _sweep_config()
    local = experiment.run(cfg).records
    dask = experiment.run(cfg, executor="dask", jobs=2).records
    assert _strip(local) == _strip(dask)


def test_sweep_command_and_bad_executor(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ROOT / "configs" / "fork-folio-sizes.toml"
    assert main(["sweep", str(cfg), *_sets("fork-folio-sizes"), "--jobs", "2", "--out", str(tmp_path),
                 "--no-plots", "--quiet"]) == 0
    assert len(json.loads((tmp_path / "records.json").read_text())) == 2 * 3 * 3
    capsys.readouterr()
    assert main(["sweep", str(cfg), "--executor", "ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ray" in err and "dask://HOST:PORT" in err


def test_inspect_list_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(ROOT / "configs" / "fork-elf.toml"), "--set",
                 "processes.app.regions.arena.size=4MiB"]) == 0
    out = capsys.readouterr().out
    assert "process app" in out and "r-xp" in out and "page-table pages" in out and "16K" in out
    assert main(["inspect", str(ROOT / "configs" / "images" / "python3-numpy.smaps")]) == 0
    out = capsys.readouterr().out
    assert "pmd" in out and "libpython3.11" in out
    assert main(["list-arches"]) == 0
    out = capsys.readouterr().out
    assert "arm64+contpte" in out and "xeon-4210r" in out
    assert main(["show-config", str(ROOT / "configs" / "arch-compare.toml"), "--set", "machine.cpus=2"]) == 0
    shown = tmp_path / "shown.toml"
    shown.write_text(capsys.readouterr().out)
    assert load_config(shown).machine.cpus == 2


def test_python_dash_m() -> None:
    out = subprocess.run([sys.executable, "-m", "mmuemu", "list-arches"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert "x86_64" in out
    bad = subprocess.run([sys.executable, "-m", "mmuemu", "run", "nope.toml"], capture_output=True, text=True,
                         cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such config file" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_library_run_returns_records() -> None:
    res = mmuemu.run(ROOT / "configs" / "fork-folio-sizes.toml", SMALL["fork-folio-sizes"])
    assert len(res.records) == 2 * 3 * 3
    by = {(r["fork_mode"], r["folio_kib"], r["family"]): r["time_ns"] for r in res.records}
    assert by[("legacy", 2048, "fork")] / by[("batched", 2048, "fork")] > 1.3
    assert by[("legacy", 4, "fork")] == pytest.approx(by[("batched", 4, "fork")], rel=0.03)


def test_sweep_on_an_existing_dask_scheduler() -> None:
    distributed = pytest.importorskip("dask.distributed")
    cfg = load_config(ROOT / "configs" / "fork-folio-sizes.toml", SMALL["fork-folio-sizes"])
    local = experiment.run(cfg).records
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        address = cluster.scheduler_address.removeprefix("tcp://")
        remote = experiment.run(cfg, executor=f"dask://{address}").records
    assert _strip(local) == _strip(remote)


def test_unreachable_dask_scheduler_is_one_line(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("dask.distributed")
    monkeypatch.setattr("mmuemu.sweep.CONNECT_TIMEOUT_S", 1.0)
    cfg = ROOT / "configs" / "fork-folio-sizes.toml"
    assert main(["sweep", str(cfg), *_sets("fork-folio-sizes"), "--executor", "dask://127.0.0.1:9", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach the scheduler" in err


def test_compare_of_preemption_models_shows_latency_and_locks(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ROOT / "configs" / "fork-under-load.toml"
    assert main(["compare", str(cfg), *_sets("fork-under-load"), "--set", 'sweep."machine.fork_mode"=["batched"]',
                 "--out", str(tmp_path), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "latency: median" in text and "lock: median" in text
    with (tmp_path / "compare.csv").open() as f:
        rows = {(r["family"], r.get("of", "")): r for r in csv.DictReader(f)}
    co = rows[("latency", "co-runner")]
    # under lazy preemption a fork runs on to the tick; cond_resched lets the co-runner in
    assert float(co["latency_p99_ns lazy"]) > 50 * float(co["latency_p99_ns none"])
    assert float(rows[("lock", "ptl copy_pte_range")]["hold_p99_ns none"]) > 0
    assert rows[("fork", "")]["time_ns none"] != ""


def test_child_on_the_forkers_cpu_neither_deadlocks_nor_starves_the_co_runner() -> None:
    """A regression: the forker claimed a PTE lock for a segment's first section and ran on
    past it, so the lock stayed held and the rmap walker waiting on it hung the run; and a
    woken co-runner queued behind the exiting child (2.7 ms).  Woken tasks now go ahead of
    preempted ones, and a segment releases every lock it took."""
    from attrs import evolve

    cfg = load_config(ROOT / "configs" / "fork-under-load.toml",
                      {"sweep": {}, "machine.preempt": "none", "machine.fork_mode": "legacy"})
    cfg = evolve(cfg, experiment=evolve(cfg.experiment, child_cpu=None), output=evolve(cfg.output, trace=False,
                                                                                       plots=False))
    rows, res = experiment.run_point(experiment.points(cfg)[0])
    assert res is not None and res.counters["forks"] == 3
    co = next(r for r in rows if r["family"] == "latency" and r["task"] == "co-runner")
    assert co["latency_max_ns"] < 100_000
