"""Configs: every bad config is a one-line ConfigError naming the file, the dotted key, the
bad value and what is allowed (and ``mmuemu show-config`` prints it as one line, status 2);
good configs load with their defaults, round-trip through ``to_toml`` and take ``--set``
overrides; random documents (hypothesis) load or raise ConfigError, never anything else."""

from __future__ import annotations

import math
import os
import platform
import string
import struct
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any, NamedTuple

import attrs
import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mmuemu.cli import main
from mmuemu.config import Config, load_config, schema, to_dict, to_toml, with_overrides
from mmuemu.config.check import ADVICE, FAMILIES
from mmuemu.config.program import OPS
from mmuemu.config.values import Size
from mmuemu.errors import ConfigError
from mmuemu.sim.program import PATTERNS

MiB = 1 << 20
GiB = 1 << 30
HOST_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
    platform.machine().lower(), "x86_64")
#: the smallest valid config
MIN = '[processes.parent.regions.heap]\nsize = "8MiB"\n'
#: MIN plus a task on the SimPy runner (action tables go after ``program = ``)
SIMPY = MIN + '[experiment]\nrunner = "simpy"\n[tasks.t]\nprocess = "parent"\nprogram = '


# ======================================================================== bad configs
class Bad(NamedTuple):
    id: str
    text: str | None  # None: the file is not written
    key: str | None  # the dotted key the message names (None: a file-level error)
    fragment: str  # a distinctive part of the message
    sets: tuple[str, ...] = ()
    filename: str = "cfg.toml"


def _arch(arch: str, *, contpte: bool = False, orders: str = "[0]") -> str:
    return (f'[machine]\narch = "{arch}"\ncontpte = {str(contpte).lower()}\n'
            f"[processes.parent]\nfolio_orders = {orders}\n" + MIN)


BAD = [
    # ---- wrong types
    Bad("cpus-string", '[machine]\ncpus = "four"\n' + MIN, "machine.cpus", "'four': expected an integer"),
    Bad("cpus-float", "[machine]\ncpus = 4.5\n" + MIN, "machine.cpus", "4.5: expected an integer"),
    Bad("cpus-bool", "[machine]\ncpus = true\n" + MIN, "machine.cpus", "true: expected an integer"),
    Bad("contpte-int", '[machine]\narch = "arm64"\ncontpte = 1\n' + MIN, "machine.contpte",
        "= 1: expected true or false"),
    Bad("orders-string-for-list", '[processes.parent]\nfolio_orders = "0, 4"\n' + MIN,
        "processes.parent.folio_orders", "'0, 4': expected a list"),
    Bad("orders-element", '[processes.parent]\nfolio_orders = [0, "4"]\n' + MIN,
        "processes.parent.folio_orders.1", "'4': expected an integer"),
    Bad("madvise-string-for-list", MIN + 'madvise = "hugepage"\n',
        "processes.parent.regions.heap.madvise", "'hugepage': expected a list"),
    Bad("summary-string-for-list", MIN + '[output]\nsummary = "time_ns"\n', "output.summary",
        "expected a list"),
    Bad("table-for-string", '[machine]\narch = { name = "arm64" }\n' + MIN, "machine.arch",
        "{'name': 'arm64'}: expected a string"),
    Bad("table-for-size", MIN + "align = { bytes = 4096 }\n", "processes.parent.regions.heap.align",
        "expected a size"),
    Bad("value-for-table", "machine = 3\n" + MIN, "machine", "machine = 3: expected a table"),
    Bad("list-for-table", "processes = [1, 2]\n", "processes", "expected a table"),
    Bad("value-for-region", "[processes.parent]\nregions = { heap = 5 }\n",
        "processes.parent.regions.heap", "expected a table"),
    Bad("name-int", "name = 3\n" + MIN, "name", "3: expected a string"),
    Bad("program-string", SIMPY + '"sleep"\n', "tasks.t.program", "'sleep': expected a list"),
    Bad("action-int", SIMPY + "[3]\n", "tasks.t.program.0", "expected a table"),
    Bad("action-ns-string", SIMPY + '[{ op = "sleep", ns = "fast" }]\n', "tasks.t.program.0.ns",
        "'fast': expected a number of nanoseconds"),
    Bad("action-missing-field", SIMPY + '[{ op = "mprotect", addr = 4096 }]\n', "tasks.t.program.0",
        "missing required key"),
    Bad("sweep-not-list", MIN + '[sweep]\n"machine.cpus" = 4\n', "sweep.machine.cpus", "expected a list"),
    # ---- unknown keys at every level
    Bad("unknown-top", "machin = {}\n" + MIN, "machin", "(did you mean 'machine'?)"),
    Bad("unknown-top-nohint", "zzz = 1\n" + MIN, "zzz", "allowed in the top level: name,"),
    Bad("source-key", "source = 'x'\n" + MIN, "source", "the file a config came from"),
    Bad("unknown-machine", "[machine]\ncpu = 4\n" + MIN, "machine.cpu",
        "(did you mean 'machine.cpus'?)"),
    Bad("unknown-process", "[processes.parent]\nfolio_order = [0]\n" + MIN,
        "processes.parent.folio_order", "(did you mean 'processes.parent.folio_orders'?)"),
    Bad("unknown-region", MIN + 'populat = "write"\n', "processes.parent.regions.heap.populat",
        "(did you mean 'processes.parent.regions.heap.populate'?)"),
    Bad("unknown-task", SIMPY + "[]\nstart = 5\n", "tasks.t.start", "(did you mean 'tasks.t.start_ns'?)"),
    Bad("unknown-action-key", SIMPY + '[{ op = "sleep", nss = 1000 }]\n', "tasks.t.program.0.nss",
        "(did you mean 'ns'?)"),
    Bad("unknown-action-in-loop",
        SIMPY + '[{ op = "loop", times = 2, body = [{ op = "run", n = 5 }] }]\n',
        "tasks.t.program.0.body.0.n", "(did you mean 'ns'?)"),
    Bad("unknown-op", SIMPY + '[{ op = "slep", ns = 1 }]\n', "tasks.t.program.0.op",
        "(did you mean 'sleep'?)"),
    Bad("op-list", SIMPY + '[{ op = ["sleep"], ns = 1 }]\n', "tasks.t.program.0.op",
        "['sleep']: allowed: run, sleep,"),
    Bad("op-missing", SIMPY + '[{ ns = 1 }]\n', "tasks.t.program.0.op", "allowed: run, sleep,"),
    Bad("unknown-experiment", MIN + "[experiment]\nrepetition = 2\n", "experiment.repetition",
        "(did you mean 'experiment.repetitions'?)"),
    Bad("unknown-compare", MIN + '[compare]\nmetric = ["time_ns"]\n', "compare.metric",
        "(did you mean 'compare.metrics'?)"),
    Bad("unknown-output", MIN + "[output]\nplot = false\n", "output.plot", "(did you mean 'output.plots'?)"),
    Bad("unknown-in-variant", MIN + '[compare.variants]\nbig = { "machine.cpu" = 8 }\n', "machine.cpu",
        "(did you mean 'machine.cpus'?); allowed in machine: arch,"),
    Bad("unknown-cost-op", MIN + "[machine.cost_ns]\npte_writs = 1.0\n", "machine.cost_ns.pte_writs",
        "(did you mean 'pte_writes'?)"),
    # ---- sizes
    Bad("size-1GB", '[processes.parent.regions.heap]\nsize = "1GB"\n', "processes.parent.regions.heap.size",
        "did you mean '1GiB'?"),
    Bad("size-4kB", '[processes.parent.regions.heap]\nsize = "4kB"\n', "processes.parent.regions.heap.size",
        "did you mean '4KiB'?"),
    Bad("size-parsecs", '[processes.parent.regions.heap]\nsize = "12 parsecs"\n',
        "processes.parent.regions.heap.size", "'12 parsecs': expected a size"),
    Bad("size-empty", '[processes.parent.regions.heap]\nsize = ""\n', "processes.parent.regions.heap.size",
        "'': expected a size"),
    Bad("size-negative-string", '[processes.parent.regions.heap]\nsize = "-5MiB"\n',
        "processes.parent.regions.heap.size", "'-5MiB': a size cannot be negative"),
    Bad("size-negative", "[processes.parent.regions.heap]\nsize = -5\n", "processes.parent.regions.heap.size",
        "-5: a size cannot be negative"),
    Bad("size-zero", "[processes.parent.regions.heap]\nsize = 0\n", "processes.parent.regions.heap.size",
        "0: a region needs a positive size"),
    Bad("size-fraction", '[processes.parent.regions.heap]\nsize = "0.5B"\n',
        "processes.parent.regions.heap.size", "whole number of bytes"),
    Bad("size-float", "[processes.parent.regions.heap]\nsize = 4096.0\n", "processes.parent.regions.heap.size",
        "expected a size"),
    Bad("size-too-big", '[processes.parent.regions.heap]\nsize = "128TiB"\n',
        "processes.parent.regions.heap.size", "larger than the user address space"),
    Bad("memory-1GB", '[machine]\nmemory = "1GB"\n' + MIN, "machine.memory", "did you mean '1GiB'?"),
    Bad("align-not-pow2", MIN + "align = 12288\n", "processes.parent.regions.heap.align", "a power of two"),
    Bad("memory-too-small-for-regions", '[machine]\nmemory = "16MiB"\n' + MIN.replace("8MiB", "32MiB"),
        "machine.memory", "the regions populate 32 MiB"),
    Bad("memory-tiny", '[machine]\nmemory = "1MiB"\n' + MIN, "machine.memory", "at least 4MiB"),
    # ---- folio orders the arch cannot map
    Bad("order-1-x86", _arch("x86_64", orders="[0, 1]"), "processes.parent.folio_orders",
        "folio order 1 cannot be mapped on x86_64"),
    Bad("order-10-x86", _arch("x86_64", orders="[10]"), "processes.parent.folio_orders",
        "folio order 10 cannot be mapped on x86_64"),
    Bad("order-12-x86-region", MIN + "folio_orders = [4, 12]\n", "processes.parent.regions.heap.folio_orders",
        "folio order 12 cannot be mapped on x86_64"),
    Bad("order-negative", _arch("x86_64", orders="[-1]"), "processes.parent.folio_orders",
        "folio order -1 cannot be mapped"),
    Bad("order-1-arm64", _arch("arm64", orders="[1]"), "processes.parent.folio_orders",
        "folio order 1 cannot be mapped on arm64"),
    Bad("order-10-arm64", _arch("arm64", orders="[9, 10]"), "processes.parent.folio_orders",
        "folio order 10 cannot be mapped on arm64"),
    Bad("order-12-arm64-contpte", _arch("arm64", contpte=True, orders="[12]"), "processes.parent.folio_orders",
        "folio order 12 cannot be mapped on arm64"),
    # ---- the machine
    Bad("arch-unknown", '[machine]\narch = "arm46"\n' + MIN, "machine.arch",
        "'arm46': allowed: arm64, x86_64 (did you mean 'arm64'?)"),
    Bad("arch-x86", '[machine]\narch = "x86-64"\n' + MIN, "machine.arch", "(did you mean 'x86_64'?)"),
    Bad("contpte-x86", "[machine]\ncontpte = true\n" + MIN, "machine.contpte",
        "only arm64 has contpte mappings"),
    Bad("arm64-option-unknown", '[machine]\narch = "arm64"\noptions = { hafdb = true }\n' + MIN,
        "machine.options", "unknown arm64 option 'hafdb'; allowed: hafdbs, kpti, tlbi_range (did you mean 'hafdbs'?)"),
    Bad("arm64-option-not-bool", '[machine]\narch = "arm64"\noptions = { kpti = 1 }\n' + MIN,
        "machine.options.kpti", "1: expected true or false"),
    Bad("arm64-option-needs-contpte", '[machine]\narch = "arm64"\noptions = { bbml2 = true }\n' + MIN,
        "machine.options", "'bbml2' needs contpte=True"),
    Bad("x86-option", "[machine]\noptions = { kpti = true }\n" + MIN, "machine.options",
        "x86_64 takes none"),
    Bad("contpte-as-option", '[machine]\narch = "arm64"\noptions = { contpte = true }\n' + MIN,
        "machine.options.contpte", "set machine.contpte instead"),
    Bad("cpus-zero", "[machine]\ncpus = 0\n" + MIN, "machine.cpus", "must be at least 1"),
    Bad("cpus-many", "[machine]\ncpus = 1024\n" + MIN, "machine.cpus", "at most 256"),
    Bad("costs-unknown", '[machine]\ncosts = "xeon"\n' + MIN, "machine.costs", "unknown cost model 'xeon'"),
    Bad("costs-directory", '[machine]\ncosts = "{tmp}/costs.d.toml"\n' + MIN, "machine.costs",
        "costs.d.toml': cannot read it"),
    Bad("costs-binary", '[machine]\ncosts = "{tmp}/binary.toml"\n' + MIN, "machine.costs",
        "binary.toml': not a text file"),
    Bad("cost-negative", MIN + "[machine.cost_ns]\npte_writes = -1.0\n", "machine.cost_ns.pte_writes",
        "-1.0: a cost cannot be negative"),
    # ---- enums
    Bad("fork-mode", '[machine]\nfork_mode = "fast"\n' + MIN, "machine.fork_mode",
        "'fast': allowed: 'batched', 'legacy'"),
    Bad("preempt", '[machine]\npreempt = "ful"\n' + MIN, "machine.preempt", "'ful': allowed: 'none', "),
    Bad("hz", "[machine]\nhz = 7\n" + MIN, "machine.hz", "7: allowed: 100, 250, 300, 1000"),
    Bad("experiment-kind", MIN + '[experiment]\nkind = "forkk"\n', "experiment.kind",
        "'forkk': allowed: 'fork', 'munmap'"),
    Bad("experiment-runner", MIN + '[experiment]\nrunner = "fast"\n', "experiment.runner",
        "'fast': allowed: 'instant', 'simpy'"),
    Bad("populate", MIN + 'populate = "yes"\n', "processes.parent.regions.heap.populate",
        "'yes': allowed: 'none', 'read', 'write'"),
    Bad("prot", MIN + 'prot = "wx"\n', "processes.parent.regions.heap.prot", "'wx': allowed: '', 'r',"),
    Bad("madvise-advice", MIN + 'madvise = ["hugepag"]\n', "processes.parent.regions.heap.madvise",
        "(did you mean 'hugepage'?)"),
    Bad("compare-family", MIN + '[compare]\nfamilies = ["forks"]\n', "compare.families",
        "'forks': allowed: fork, exit, munmap"),
    Bad("fork-child-table", SIMPY + '[{ op = "fork", child = { op = "exit" } }]\n',
        "tasks.t.program.0.child", "expected a list of action tables"),
    Bad("run-ns-nan", SIMPY + '[{ op = "run", ns = nan }]\n', "tasks.t.program.0.ns",
        "nan: expected a number of nanoseconds"),
    Bad("interval-nan", MIN + "[experiment]\ninterval_ns = nan\n", "experiment.interval_ns",
        "nan: must be at least 0"),
    Bad("start-negative", SIMPY + "[]\nstart_ns = -1\n", "tasks.t.start_ns", "start_ns = -1: must be at least 0"),
    Bad("cost-nan", MIN + "[machine.cost_ns]\npte_writes = nan\n", "machine.cost_ns.pte_writes",
        "nan: a cost cannot be negative"),
    Bad("fork-child", SIMPY + '[{ op = "fork", child = "die" }]\n', "tasks.t.program.0",
        "'die'; allowed: 'exit', 'stay'"),
    Bad("access-pattern", SIMPY + '[{ op = "access", region = "heap", pattern = "zigzag" }]\n',
        "tasks.t.program.0", "'zigzag'; allowed: sequential"),
    # ---- missing keys, names that refer to nothing
    Bad("region-without-size", "[processes.parent.regions.heap]\npopulate = \"read\"\n",
        "processes.parent.regions.heap", "missing required key 'size'"),
    Bad("experiment-process", MIN + '[experiment]\nprocess = "parnt"\n', "experiment.process",
        "'parnt': no such process; processes: parent (did you mean 'parent'?)"),
    Bad("experiment-no-processes", "[machine]\ncpus = 2\n", "experiment.process",
        "add a [processes.NAME] table"),
    Bad("task-process", MIN + '[experiment]\nrunner = "simpy"\n[tasks.t]\nprocess = "paren"\n',
        "tasks.t.process", "'paren': no such process; processes: parent (did you mean 'parent'?)"),
    Bad("task-cpu", SIMPY + "[]\ncpu = 4\n", "tasks.t.cpu", "this machine has CPUs 0..3"),
    Bad("rmap-walk-process", SIMPY + '[{ op = "rmap-walk", process = "prent", region = "heap" }]\n',
        "tasks.t.program.0.process", "'prent': no such process; processes: parent (did you mean 'parent'?)"),
    Bad("rmap-walk-process-list", SIMPY + '[{ op = "rmap-walk", process = ["parent"], region = "heap" }]\n',
        "tasks.t.program.0.process", "['parent']: no such process"),
    Bad("rmap-walk-region", SIMPY + '[{ op = "rmap-walk", process = "parent", region = "heep" }]\n',
        "tasks.t.program.0.region", "'heep': no such region; regions: heap (did you mean 'heap'?)"),
    Bad("access-region", SIMPY + '[{ op = "access", region = "haep" }]\n', "tasks.t.program.0.region",
        "'haep': no region or mapping of this task is called that; known: heap (did you mean 'heap'?)"),
    Bad("madvise-region", SIMPY + '[{ op = "madvise", region = "hep", advice = "dontfork" }]\n',
        "tasks.t.program.0.region", "'hep': no such region"),
    Bad("munmap-region-in-child",
        SIMPY + '[{ op = "fork", child = [{ op = "munmap", region = "stak" }] }]\n',
        "tasks.t.program.0.child.0.region", "'stak': no region or mapping"),
    Bad("region-on-sleep", SIMPY + '[{ op = "sleep", ns = 1, region = "heap" }]\n',
        "tasks.t.program.0.region", "a 'sleep' action takes no region"),
    Bad("program-kind-without-tasks", MIN + '[experiment]\nkind = "program"\n', "experiment.kind",
        "needs at least one [tasks.NAME] table"),
    Bad("tasks-on-instant-runner", MIN + "[tasks.t]\nprocess = \"parent\"\n", "experiment.runner",
        "'instant': tasks run only on the SimPy runner"),
    Bad("forker-cpu", "[machine]\ncpus = 2\n" + MIN + "[experiment]\nforker_cpu = 2\n",
        "experiment.forker_cpu", "this machine has CPUs 0..1"),
    # ---- files
    Bad("toml-syntax", MIN + "[machine\ncpus = 4\n", None, "not valid TOML"),
    Bad("toml-duplicate-key", MIN + "size = 4\n", None, "not valid TOML"),
    Bad("missing-config", None, None, "no such config file", filename="missing.toml"),
    Bad("config-is-directory", None, None, "is a directory, not a config file", filename="dir.toml"),
    Bad("config-is-binary", None, None, "not a text file", filename="binary.toml"),
    Bad("elf-missing", '[processes.p]\nelf = "/nonexistent"\n' + MIN, "processes.p.elf",
        "'/nonexistent': no such ELF file"),
    Bad("elf-and-smaps", '[processes.p]\nelf = "notes.txt"\nsmaps = "notes.txt"\n' + MIN, "processes.p.elf",
        "not both"),
    Bad("elf-text-file", '[processes.p]\nelf = "notes.txt"\n' + MIN, "processes.p.elf",
        "notes.txt: not an ELF file"),
    Bad("elf-truncated-header", f'[machine]\narch = "{HOST_ARCH}"\n[processes.p]\nelf = "header.elf"\n' + MIN,
        "processes.p.elf", "header.elf: not an ELF file or a damaged one"),
    Bad("elf-truncated-segments", f'[machine]\narch = "{HOST_ARCH}"\n[processes.p]\nelf = "cut.elf"\n' + MIN,
        "processes.p.elf", "cut.elf: PT_LOAD at"),
    Bad("smaps-missing", '[processes.p]\nsmaps = "nope.smaps"\n' + MIN, "processes.p.smaps", "no such smaps file"),
    # ---- sweep and compare
    Bad("sweep-empty-axis", MIN + '[sweep]\n"machine.cpus" = []\n', "sweep.machine.cpus",
        "a sweep axis needs at least one value"),
    Bad("sweep-bad-value", MIN + '[sweep]\n"machine.cpus" = [2, "x"]\n', "machine.cpus",
        "'x': expected an integer (set by sweep.machine.cpus)"),
    Bad("sweep-bad-arch", MIN + '[sweep]\n"machine.arch" = ["x86_64", "arm46"]\n', "machine.arch",
        "(did you mean 'arm64'?) (set by sweep.machine.arch)"),
    Bad("sweep-unknown-key", MIN + '[sweep]\n"machine.cpu" = [2]\n', "machine.cpu",
        "(did you mean 'machine.cpus'?)"),
    Bad("sweep-of-sweep", MIN + '[sweep]\n"sweep.x" = [[1]]\n', "sweep.sweep.x", "cannot be swept"),
    Bad("compare-across-empty", MIN + '[compare.across]\n"machine.arch" = []\n', "compare.across.machine.arch",
        "an axis needs at least one value"),
    Bad("compare-across-bad", MIN + '[compare.across]\n"machine.fork_mode" = ["batched", "fast"]\n',
        "machine.fork_mode", "'fast': allowed: 'batched', 'legacy' (set by compare.across.machine.fork_mode)"),
    Bad("compare-speedup", MIN + '[compare]\nacross = { "machine.fork_mode" = ["batched", "legacy"] }\n'
        'speedup = "machine.arch"\n', "compare.speedup",
        "'machine.arch': must name a compare.across axis with at least two values; axes: machine.fork_mode"),
    Bad("compare-speedup-one-value", MIN + '[compare]\nacross = { "machine.cpus" = [2] }\n'
        'speedup = "machine.cpus"\n', "compare.speedup", "at least two values"),
    Bad("compare-file-without-compare", MIN, "compare", "a comparison config must declare its columns",
        filename="arch-compare.toml"),
    # ---- --set
    Bad("set-without-equals", MIN, "machine.cpus", "override 'machine.cpus' must look like key=value",
        sets=("machine.cpus",)),
    Bad("set-empty-key", MIN, None, "override '=4' must look like key=value", sets=("=4",)),
    Bad("set-empty-part", MIN, "machine..cpus", "has an empty part", sets=("machine..cpus=4",)),
    Bad("set-into-scalar", "[machine]\ncpus = 4\n" + MIN, "machine.cpus", "machine.cpus = 4 is not a table",
        sets=("machine.cpus.x=3",)),
    Bad("set-into-default", MIN, "machine.cpus", "{'x': 3}: expected an integer", sets=("machine.cpus.x=3",)),
    Bad("set-into-size", MIN, "processes.parent.regions.heap.size", "is not a table",
        sets=("processes.parent.regions.heap.size.x=3",)),
    Bad("set-into-list-element", "[processes.parent]\nfolio_orders = [0]\n" + MIN,
        "processes.parent.folio_orders.0", "is not a table", sets=("processes.parent.folio_orders.0.x=3",)),
    Bad("set-list-index", "[processes.parent]\nfolio_orders = [0]\n" + MIN, "processes.parent.folio_orders.3",
        "index '3' out of range: the list has 1 element", sets=("processes.parent.folio_orders.3=4",)),
    Bad("set-bad-value", MIN, "machine.cpus", "'many': expected an integer", sets=("machine.cpus=many",)),
    Bad("set-unknown-key", MIN, "machine.arc", "(did you mean 'machine.arch'?)", sets=("machine.arc=arm64",)),
    Bad("set-bad-size", MIN, "processes.parent.regions.heap.size", "did you mean '8GiB'?",
        sets=("processes.parent.regions.heap.size=8GB",)),
]


def _files(tmp_path: Path) -> None:
    """The files bad configs point at."""
    (tmp_path / "notes.txt").write_text("not an ELF\n")
    (tmp_path / "dir.toml").mkdir()
    (tmp_path / "costs.d.toml").mkdir()
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00\x80name = 1\n")
    elf = bytearray(Path(os.path.realpath(sys.executable)).read_bytes())
    (tmp_path / "header.elf").write_bytes(elf[:64])
    # cut inside the last PT_LOAD's file data, the section headers dropped
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    end = 0
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            end = max(end, p_offset + p_filesz)
    struct.pack_into("<Q", elf, 0x28, 0)  # e_shoff
    struct.pack_into("<HHH", elf, 0x3A, 0, 0, 0)  # e_shentsize, e_shnum, e_shstrndx
    (tmp_path / "cut.elf").write_bytes(elf[: end - 1])


def _one_line_error(e: pytest.ExceptionInfo[ConfigError], path: Path, key: str | None, fragment: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert str(path) in msg, msg
    if key is not None:
        assert key in msg, msg
    assert fragment in msg, msg
    return msg


def test_bad_corpus_ids_are_unique() -> None:
    ids = [b.id for b in BAD]
    assert len(ids) == len(set(ids)) and len(BAD) >= 100


@pytest.mark.parametrize("case", BAD, ids=[b.id for b in BAD])
def test_bad_config(case: Bad, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _files(tmp_path)
    path = tmp_path / case.filename
    if case.text is not None:
        path.write_text(case.text.replace("{tmp}", str(tmp_path)))
    with pytest.raises(ConfigError) as e:
        load_config(path, list(case.sets))
    msg = _one_line_error(e, path, case.key, case.fragment)
    capsys.readouterr()

    argv = ["show-config", str(path)]
    for s in case.sets:
        argv += ["--set", s]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"mmuemu: error: {msg}\n"


def test_bad_config_from_dict_names_the_source() -> None:
    with pytest.raises(ConfigError) as e:
        load_config({"machine": {"cpus": "four"}}, name="inline.toml")
    _one_line_error(e, Path("inline.toml"), "machine.cpus", "'four': expected an integer")
    with pytest.raises(ConfigError) as e:
        load_config({"processes": {"parent": {}}}, {"machine.arch": "arm46"})
    _one_line_error(e, Path("<config>"), "machine.arch", "did you mean 'arm64'?")


def test_cli_usage_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["show-config"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("mmuemu show-config: error:")


# ======================================================================== good configs
RICH = """\
name = "rich"
description = "every section"

[machine]
arch = "arm64"
contpte = true
options = { hafdbs = false, contpte_fold = true }
cpus = 8
memory = "2GiB"
fork_mode = "legacy"
preempt = "full"
hz = 1000
costs = "altra"
cost_ns = { pte_writes = 1.5 }
cost_sim = { context_switch = 900.0 }

[processes.parent]
folio_orders = [0, 4]

[processes.parent.regions.heap]
size = "256MiB"
folio_orders = [4, 9]
madvise = ["hugepage", "dontfork"]
align = "64KiB"

[processes.parent.regions.shm]
size = 1048576
shared = true
prot = "r"
populate = "none"

[processes.co]

[tasks.worker]
process = "parent"
cpu = 1
start_ns = 500_000
program = [
    { op = "mmap", length = "1MiB", name = "buf", populate = true },
    { op = "access", region = "buf", pattern = "zipf", zipf_a = 1.5, writes = 0.25, count = 1000 },
    { op = "loop", times = 3, body = [
        { op = "access", region = "heap", pattern = "random", count = 10, seed = 7 },
        { op = "sleep", ns = 1e5 },
    ] },
    { op = "fork", child = [{ op = "run", ns = 1000 }, { op = "munmap", region = "heap" }, { op = "exit" }], cpu = 2 },
    { op = "fork", child = "stay", mode = "batched" },
    { op = "mprotect", region = "heap", prot = "r" },
    { op = "madvise", region = "heap", advice = "dontfork" },
    { op = "munmap", region = "buf" },
]

[tasks.reclaim]
program = [{ op = "rmap-walk", process = "parent", region = "heap", pages = 64, hold_ns = 2000 }]

[experiment]
kind = "fork-under-load"
process = "parent"
forks = 3
interval_ns = 3e6
forker_cpu = 0
until_ns = 1e9
seed = 42

[sweep]
"machine.preempt" = ["none", "lazy"]
"processes.parent.folio_orders" = [[0], [4], [9]]

[compare]
metrics = ["time_ns", "tlbi_ops"]
families = ["fork"]
across = { "machine.fork_mode" = ["batched", "legacy"] }
speedup = "machine.fork_mode"

[compare.variants]
plain = { "machine.contpte" = false, "machine.options" = { hafdbs = true } }
"with.dots" = { "machine.cpus" = 4 }

[output]
dir = "out/rich"
plots = false
trace = true
summary = ["fork.time_ns"]
"""


def test_minimal_config_defaults(tmp_path: Path) -> None:
    path = tmp_path / "minimal.toml"
    path.write_text(MIN)
    cfg = load_config(path)
    assert cfg.source == str(path) and cfg.name == "minimal" and cfg.description == ""
    mc = cfg.machine
    assert (mc.arch, mc.contpte, mc.options, mc.cpus, mc.memory) == ("x86_64", False, {}, 4, 4 * GiB)
    assert (mc.fork_mode, mc.preempt, mc.hz, mc.costs) == ("batched", "none", 250, "default")
    pc = cfg.processes["parent"]
    assert pc.folio_orders == [0] and pc.elf is None and pc.smaps is None
    heap = pc.regions["heap"]
    assert isinstance(heap.size, Size) and heap.size == 8 * MiB and heap.align == 2 * MiB
    assert (heap.prot, heap.shared, heap.folio_orders, heap.populate) == ("rw", False, None, "write")
    ex = cfg.experiment
    assert (ex.kind, ex.runner, ex.process, ex.repetitions, ex.check) == ("fork", "instant", "parent", 1, True)
    assert cfg.tasks == {} and cfg.sweep == {} and cfg.compare == schema.CompareConfig()
    assert cfg.output == schema.OutputConfig()
    # the same tables as a dict, and through the CLI
    assert load_config({"processes": {"parent": {"regions": {"heap": {"size": "8MiB"}}}}},
                       name=str(path)) == cfg


def test_rich_config_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "rich.toml"
    path.write_text(RICH)
    cfg = load_config(path)
    assert cfg.name == "rich" and cfg.machine.options == {"hafdbs": False, "contpte_fold": True}
    assert cfg.processes["parent"].regions["heap"].align == 64 << 10
    assert cfg.processes["co"] == schema.ProcessConfig()
    assert cfg.experiment.until_ns == 1e9 and isinstance(cfg.experiment.interval_ns, float)
    assert cfg.tasks["worker"].program[3]["child"][1] == {"op": "munmap", "region": "heap"}
    assert cfg.sweep["processes.parent.folio_orders"] == [[0], [4], [9]]
    assert cfg.compare.variants["with.dots"] == {"machine.cpus": 4}

    text = to_toml(cfg)
    again = tmp_path / "again" / "rich.toml"
    again.parent.mkdir()
    again.write_text(text)
    back = load_config(again)
    assert attrs.evolve(back, source=cfg.source) == cfg
    assert to_toml(back) == text
    assert "source" not in to_dict(cfg)

    assert main(["show-config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out == text


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.toml")),
                         ids=lambda p: p.name)
def test_shipped_configs_round_trip(path: Path) -> None:
    cfg = load_config(path)
    # from the same source: image paths are relative to the config's directory
    assert load_config(tomllib.loads(to_toml(cfg)), name=cfg.source) == cfg


def test_set_overrides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cfg.toml"
    path.write_text("[processes.parent]\nfolio_orders = [0]\n" + MIN)
    sets = ["machine.cpus=8", "experiment.check=false", "processes.parent.folio_orders=[0, 4]",
            "processes.parent.regions.heap.size=16MiB", 'machine.arch="arm64"', "machine.contpte=true",
            "description=a plain string", 'sweep."machine.fork_mode"=["batched","legacy"]',
            "processes.parent.regions.heap.madvise=[\"hugepage\"]", "experiment.interval_ns=5",
            "processes.child.regions.stack.size=1MiB", "machine.options.hafdbs=false"]
    cfg = load_config(path, sets)
    assert cfg.machine.cpus == 8 and cfg.experiment.check is False
    assert cfg.processes["parent"].folio_orders == [0, 4]
    assert cfg.processes["parent"].regions["heap"].size == 16 * MiB
    assert cfg.processes["parent"].regions["heap"].madvise == ["hugepage"]
    assert cfg.processes["child"].regions["stack"].size == MiB
    assert (cfg.machine.arch, cfg.machine.contpte, cfg.machine.options) == ("arm64", True, {"hafdbs": False})
    assert cfg.description == "a plain string"
    assert cfg.sweep == {"machine.fork_mode": ["batched", "legacy"]}
    assert cfg.experiment.interval_ns == 5.0 and isinstance(cfg.experiment.interval_ns, float)
    # a list element by index, and a mapping of dotted keys
    assert load_config(path, ["processes.parent.folio_orders.0=9"]).processes["parent"].folio_orders == [9]
    assert load_config(path, {"machine.hz": 100, 'sweep."machine.cpus"': [1, 2]}).sweep == {"machine.cpus": [1, 2]}
    # the file is unchanged, and the CLI prints the overridden config
    assert load_config(path).machine.cpus == 4
    argv = ["show-config", str(path)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == "" and out == to_toml(cfg)


def test_with_overrides(tmp_path: Path) -> None:
    path = tmp_path / "rich.toml"
    path.write_text(RICH)
    cfg = load_config(path)
    point = with_overrides(cfg, {"machine.preempt": "voluntary", "processes.parent.folio_orders": [2]},
                           strip_axes=True)
    assert point.machine.preempt == "voluntary" and point.processes["parent"].folio_orders == [2]
    assert point.sweep == {} and point.compare == schema.CompareConfig()
    assert point.source == cfg.source and point.name == "rich"
    assert cfg.machine.preempt == "full"  # unchanged
    kept = with_overrides(cfg, {"machine.cpus": 4})
    assert kept.sweep == cfg.sweep and kept.machine.cpus == 4
    assert attrs.evolve(kept, machine=cfg.machine) == cfg
    with pytest.raises(ConfigError) as e:
        with_overrides(cfg, {"machine.arch": "x86_64"}, "variant v", strip_axes=True)
    _one_line_error(e, path, "machine.contpte", "only arm64 has contpte mappings, not x86_64 (set by variant v)")


# ======================================================================== hypothesis
def _hints(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, vars(schema))
    return {f.name: hints[f.name] for f in attrs.fields(cls) if f.name != "source"}


def _choices(cls: type) -> dict[str, tuple[Any, ...]]:
    """The allowed values of each enum-like field of ``cls`` (from its validators)."""
    out = {}
    for f in attrs.fields(cls):
        choices = getattr(f.validator, "choices", None)
        if choices:
            out[f.name] = tuple(choices)
    return out


#: the schema: class -> field -> type, taken from the attrs classes
SCHEMA: dict[type, dict[str, Any]] = {cls: _hints(cls) for cls in (schema.Config, schema.MachineConfig, schema.ProcessConfig,
                                       schema.RegionConfig, schema.TaskConfig, schema.ExperimentConfig,
                                       schema.CompareConfig, schema.OutputConfig)}
CHOICES = {name: values for cls in SCHEMA for name, values in _choices(cls).items()}
ALL_KEYS = sorted({k for fields in SCHEMA.values() for k in fields})
PROCS = ("parent", "co", "child")
REGIONS = ("heap", "stack")
TASKS = ("t", "u")
#: the names each named-table field uses
TABLE_NAMES = {"processes": PROCS, "regions": REGIONS, "tasks": TASKS, "variants": ("a", "b.c")}
GOOD_SIZES = ("4KiB", "64KiB", "1MiB", "8MiB", "2MiB", " 64 KiB ", "1.5KiB", 4096, 8 * MiB, 12288)
BAD_SIZES = ("1GB", "", "12 parsecs", "-5MiB", "0", "0.5B", "1e3", "128TiB", "MiB", -5, 0, 2**62)
#: dotted keys that sweeps, compare axes and variants set (some of them bad)
DOTTED = ("machine.arch", "machine.cpus", "machine.contpte", "machine.fork_mode", "machine.memory",
          "machine.preempt", "processes.parent.folio_orders", "processes.parent.regions.heap.size",
          "experiment.kind", "experiment.runner", "experiment.repetitions", "machine.options.kpti",
          "sweep.x", "compare.speedup", "machine..cpus", "tasks.t.program.0.ns", "machine.cpus.x",
          "processes.parent.elf", "name", "machin.cpus")
#: plausible values of dotted keys
AXIS_VALUES = {"machine.arch": ("x86_64", "arm64"), "machine.cpus": (1, 2, 8), "machine.contpte": (False, True),
               "machine.fork_mode": ("batched", "legacy"), "machine.memory": ("1GiB", "64MiB"),
               "machine.preempt": ("none", "full"), "processes.parent.folio_orders": ([0], [4], [9]),
               "processes.parent.regions.heap.size": ("8MiB", "1MiB"), "experiment.kind": ("fork", "munmap"),
               "experiment.runner": ("instant", "simpy"), "experiment.repetitions": (1, 2),
               "machine.options.kpti": (True,)}

SAFE_KEY = st.text(alphabet=string.ascii_letters + string.digits + "_-. ", max_size=6).filter(
    lambda k: k not in ("elf", "smaps", "costs"))
scalars = st.one_of(
    st.integers(-3, 300), st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(),
    st.text(max_size=8), st.sampled_from(BAD_SIZES + GOOD_SIZES), st.sampled_from(ALL_KEYS),
    st.sampled_from(tuple(v for vs in CHOICES.values() for v in vs)), st.dates(), st.datetimes(),
)
#: any TOML value
anything = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SAFE_KEY | st.sampled_from(ALL_KEYS), inner,
                                                                 max_size=3),
    max_leaves=6,
)


def _rarely(draw: st.DrawFn, n: int) -> bool:
    """True about one time in ``n + 1`` (a middle value: hypothesis favours 0 and the bounds,
    and shrinks towards 0, which is False here)."""
    return draw(st.integers(0, n)) == max(1, n // 2)


def _bad(draw: st.DrawFn, name: str, tp: Any) -> Any:
    """A value for field ``name`` that is probably wrong."""
    if name in ("elf", "smaps", "costs"):  # paths: never a real file
        return draw(st.sampled_from(("nope", "a\x00.toml", "a\x00b", "missing.toml", "", 3)))
    if tp is Size:
        return draw(st.sampled_from(BAD_SIZES))
    if float in (tp, *typing.get_args(tp)) or name in ("cost_ns", "cost_sim"):
        bad = st.sampled_from((math.nan, -1.0, -math.inf, "1e6"))
        return draw(st.dictionaries(st.just("pte_writes"), bad, min_size=1) if tp is not float else bad)
    if name in CHOICES:
        return draw(st.sampled_from(CHOICES[name]).map(lambda c: c[:-1] if isinstance(c, str) else c + 1))
    if name == "folio_orders":
        return draw(st.lists(st.sampled_from((1, 10, 12, -1, 0, 4)), min_size=1, max_size=3))
    return draw(anything)


def _value(draw: st.DrawFn, name: str, tp: Any, depth: int, noise: int) -> Any:
    """A value for field ``name`` of type ``tp``: plausible, or (one time in ``noise``) bad."""
    if _rarely(draw, noise):
        return _bad(draw, name, tp)
    if name in ("elf", "smaps"):  # never a real file
        return draw(st.sampled_from(["/nonexistent/a.elf", "missing.elf", ""]))
    if name == "costs":
        return draw(st.sampled_from(["default", "altra", "m2", "xeon-4210r"]))
    if name == "arch":
        return draw(st.sampled_from(("x86_64", "arm64")))
    if name in CHOICES:
        return draw(st.sampled_from(CHOICES[name]))
    if name == "program":
        return draw(_program(depth, noise))
    if name in ("sweep", "across"):
        keys = st.sampled_from(sorted(AXIS_VALUES)) | st.sampled_from(DOTTED) if noise < 20 else \
            st.sampled_from(sorted(AXIS_VALUES))
        return draw(st.dictionaries(keys, st.lists(st.sampled_from(AXIS_VALUES["machine.cpus"]), max_size=2),
                                    max_size=2)) if _rarely(draw, 5) else {
            k: list(draw(st.lists(st.sampled_from(AXIS_VALUES.get(k, (1, "x"))), min_size=1, max_size=3)))
            for k in draw(st.lists(keys, unique=True, max_size=2))}
    if name == "variants":
        return draw(st.dictionaries(st.sampled_from(TABLE_NAMES["variants"]),
                                    st.sampled_from(sorted(AXIS_VALUES)).flatmap(
                                        lambda k: st.sampled_from(AXIS_VALUES[k]).map(lambda v: {k: v})),
                                    max_size=2))
    if name == "speedup":
        return draw(st.sampled_from(DOTTED))
    if name == "families":
        return draw(st.lists(st.sampled_from(FAMILIES), max_size=3))
    if name == "process":
        return draw(st.sampled_from(PROCS))
    if name in ("forker_cpu", "cpu"):
        return draw(st.integers(0, 3))
    if name == "cpus":
        return draw(st.integers(1, 8))
    if name in ("repetitions", "forks"):
        return draw(st.integers(1, 3))
    if name == "madvise":
        return draw(st.lists(st.sampled_from(ADVICE), max_size=2))
    if name == "folio_orders":
        return draw(st.lists(st.sampled_from((0, 2, 4, 9)), max_size=3))
    if name == "options":
        return draw(st.dictionaries(st.sampled_from(("hafdbs", "kpti", "tlbi_range", "bbml2", "contpte_fold")),
                                    st.booleans(), max_size=2))
    if name in ("cost_ns", "cost_sim"):
        return draw(st.dictionaries(st.sampled_from(("pte_writes", "tlbi_ops", "context_switch")),
                                    st.floats(0, 1e6) | st.integers(0, 9), max_size=2))
    if name == "memory":
        return draw(st.sampled_from(("64MiB", "1GiB", "16GiB", 1 << 30)))
    if name in TABLE_NAMES:
        cls = typing.get_args(tp)[1]
        return {k: draw(_table(cls, depth + 1, noise))
                for k in draw(st.lists(st.sampled_from(TABLE_NAMES[name]), unique=True, max_size=2))}
    return draw(_typed(tp, depth, noise))


@st.composite
def _typed(draw: st.DrawFn, tp: Any, depth: int, noise: int) -> Any:
    """A plausible value of type ``tp``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Size:
        return draw(st.sampled_from(GOOD_SIZES))
    if tp is bool:
        return draw(st.booleans())
    if tp is int:
        return draw(st.integers(-1, 12) | st.integers(-(2**63), 2**63 - 1))
    if tp is float:
        return draw(st.floats(0, 1e9) | st.integers(0, 10**9))
    if tp is str:
        return draw(st.text(max_size=8))
    if origin is typing.Union or (origin is not None and type(None) in args):
        return draw(_typed(next(a for a in args if a is not type(None)), depth, noise))
    if origin is list:
        return draw(st.lists(_typed(args[0] if args else Any, depth, noise), max_size=3))
    if origin is dict:
        return draw(st.dictionaries(SAFE_KEY, _typed(args[1], depth + 1, noise), max_size=2))
    if attrs.has(tp):
        return draw(_table(tp, depth + 1, noise))
    return draw(anything)


@st.composite
def _table(draw: st.DrawFn, cls: type, depth: int = 0, noise: int = 10) -> dict[Any, Any]:
    """A table of ``cls``: some of its keys (a region always has a size, unless noisy), and
    (one time in ``noise``) an unknown or misspelled key."""
    fields = SCHEMA[cls]
    names = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=len(fields)))
    if cls is schema.RegionConfig and not _rarely(draw, noise):
        names = ["size", *(n for n in names if n != "size")]
    if cls is schema.ProcessConfig and not _rarely(draw, 3):  # images (never real files) fail
        names = [n for n in names if n not in ("elf", "smaps")]
    out: dict[Any, Any] = {n: _value(draw, n, fields[n], depth, noise) for n in names}
    if _rarely(draw, noise):
        key = draw(SAFE_KEY | st.sampled_from([k[:-1] for k in fields if len(k) > 2] + ALL_KEYS)
                   | st.integers(0, 3))  # not TOML: only the documents given as dicts keep it
        if key != "":
            out[key] = draw(anything)
    return out


@st.composite
def _program(draw: st.DrawFn, depth: int, noise: int) -> list[Any]:
    n = draw(st.integers(0, 3 if depth < 3 else 1))
    return [draw(_action(depth + 1, noise)) for _ in range(n)]


GOOD_ACTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "ns": st.floats(0, 1e7) | st.integers(0, 10**7),
    "hold_ns": st.floats(0, 1e4), "ns_per_access": st.floats(0, 10),
    "length": st.sampled_from(GOOD_SIZES), "stride": st.sampled_from(GOOD_SIZES),
    "count": st.integers(0, 100), "times": st.integers(0, 5), "pages": st.integers(1, 100),
    "region": st.sampled_from((*REGIONS, "buf")), "process": st.sampled_from(PROCS),
    "name": st.sampled_from(("buf", "heap")), "prot": st.sampled_from(("r", "rw", "rx")),
    "advice": st.sampled_from(ADVICE), "pattern": st.sampled_from(PATTERNS),
    "mode": st.sampled_from(("batched", "legacy")), "writes": st.floats(0, 1), "zipf_a": st.floats(1.01, 3),
    "addr": st.integers(1 << 20, 1 << 40).map(lambda a: a & ~4095) | st.sampled_from(("buf", "heap")),
    "kind": st.sampled_from(("reclaim",)), "cpu": st.integers(0, 3), "seed": st.integers(0, 9),
    "token": st.integers(0, 9), "populate": st.booleans(), "shared": st.booleans(),
}
BAD_ACTION_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "ns": st.sampled_from((-1, "fast", float("nan"))), "length": st.sampled_from(BAD_SIZES),
    "stride": st.sampled_from(BAD_SIZES), "region": st.sampled_from(("nope", 3)),
    "process": st.sampled_from(("nope", 3, ["parent"])), "prot": st.sampled_from(("wx", 1)),
    "advice": st.just("bogus"), "pattern": st.just("zigzag"), "mode": st.just("fast"),
    "writes": st.floats(1.01, 5), "zipf_a": st.floats(-1, 1), "addr": st.integers(-(2**63), 4095),
}


@st.composite
def _action(draw: st.DrawFn, depth: int, noise: int) -> Any:
    if _rarely(draw, 4 * noise):
        return draw(anything)
    bad = _rarely(draw, noise)
    op = draw(st.sampled_from(("slep", "", "run", ["sleep"], 3)) if bad else st.sampled_from(sorted(OPS)))
    fields = [f.name for f in attrs.fields(OPS[op])] if isinstance(op, str) and op in OPS else ["ns"]
    out: dict[str, Any] = {} if bad and draw(st.booleans()) else {"op": op}
    for name in draw(st.lists(st.sampled_from([*fields, "region"]), unique=True, max_size=4)):
        if name in ("body", "child") and depth < 4:
            out[name] = draw(_program(depth, noise) | st.sampled_from(("exit", "stay"))
                             | (_action(depth + 1, noise) if bad else st.nothing()))
        elif bad and name in BAD_ACTION_VALUES and draw(st.booleans()):
            out[name] = draw(BAD_ACTION_VALUES[name])
        elif name in GOOD_ACTION_VALUES:
            out[name] = draw(GOOD_ACTION_VALUES[name])
        else:
            out[name] = draw(st.integers(-1, 5) | anything)
    if bad and draw(st.booleans()):
        out[draw(st.sampled_from(("nss", "regoin", "times_")))] = 1
    return out


@st.composite
def _program_doc(draw: st.DrawFn) -> dict[str, Any]:
    """A config whose tasks' programs are the interesting part (so that the program checks,
    which run last, see many documents)."""
    noise = draw(st.sampled_from((3, 10, 50)))
    doc: dict[str, Any] = {
        "processes": {"parent": {"regions": {r: {"size": "1MiB"} for r in REGIONS}}, "co": {}},
        "experiment": {"runner": "simpy", "kind": draw(st.sampled_from(("fork", "fork-under-load", "program")))},
        "tasks": {},
    }
    for name in draw(st.lists(st.sampled_from(TASKS), min_size=1, unique=True)):
        task: dict[str, Any] = {"program": draw(_program(0, noise))}
        doc["tasks"][name] = task
        process = draw(st.sampled_from(("parent", "co", None)))
        if process is not None:
            task["process"] = process
    return doc


@st.composite
def _config_doc(draw: st.DrawFn) -> dict[str, Any]:
    """A config document: the schema's sections and keys with plausible values, a few of
    them bad (how many: the document's noise level), and some unknown keys; or a document
    about tasks' programs."""
    if draw(st.integers(0, 2)) == 1:
        return draw(_program_doc())
    noise = draw(st.sampled_from((2, 8, 30, 200)))
    doc = draw(_table(schema.Config, 0, noise))
    if noise >= 8 and isinstance(doc.get("processes", {}), dict) and not _rarely(draw, 3):
        procs = doc.setdefault("processes", {})
        if not isinstance(procs.get("parent"), dict):
            procs["parent"] = {"regions": {"heap": {"size": "1MiB"}}}
    if doc.get("tasks") and isinstance(doc.get("experiment", {}), dict) and not _rarely(draw, 3):
        doc.setdefault("experiment", {})["runner"] = "simpy"
    return doc


#: ``--set`` arguments: known and odd dotted keys (list indexes too), TOML values and text
OVERRIDE = st.builds(
    lambda k, sep, v: f"{k}{sep}{v}",
    st.sampled_from((*DOTTED, *ALL_KEYS)) | st.builds(
        ".".join, st.lists(st.sampled_from(("processes", "parent", "folio_orders", "0", "\u00b2", "7", '"a.b"',
                                            "", "machine", "sweep")), min_size=1, max_size=4)),
    st.sampled_from(("=", "=", " = ", "", "==")),
    st.sampled_from(("4", "true", "[0, 4]", '"arm64"', "8GiB", "{a = 1}", "", "x=y", "nan", "[[1]]"))
    | st.text(max_size=5),
)
EXAMPLES = int(os.environ.get("MMUEMU_CONFIG_EXAMPLES", "150"))


def _no_nan(x: Any) -> bool:
    if isinstance(x, dict):
        return all(_no_nan(v) for v in x.values())
    if isinstance(x, list):
        return all(_no_nan(v) for v in x)
    return not (isinstance(x, float) and math.isnan(x))


def _loads_or_config_error(load: Any, source: str) -> Config | None:
    """The config ``load`` returns, or None if it raises a one-line ConfigError naming
    ``source``."""
    try:
        cfg = load()
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and "\r" not in msg, msg
        assert msg.startswith(f"{source}: "), msg
        return None
    assert isinstance(cfg, Config)
    assert _no_nan(to_dict(cfg)), cfg  # NaN is never a valid number
    return cfg


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])
@given(doc=_config_doc(), as_file=st.booleans(), sets=st.lists(OVERRIDE, max_size=2))
def test_hypothesis_documents(doc: dict[str, Any], as_file: bool, sets: list[str], tmp_path: Path) -> None:
    if as_file:
        try:
            text = tomli_w.dumps(doc)
        except (TypeError, ValueError):  # not representable in TOML (e.g. a key of a bad type)
            assume(False)
        path = tmp_path / "fuzz.toml"
        path.write_text(text)
        cfg = _loads_or_config_error(lambda: load_config(path, sets), str(path))
        if cfg is not None:  # a valid config round-trips
            path.write_text(to_toml(cfg))
            assert load_config(path) == cfg
    else:
        cfg = _loads_or_config_error(lambda: load_config(doc, sets, name="fuzz.toml"), "fuzz.toml")
        if cfg is not None:
            assert load_config(to_dict(cfg), name="fuzz.toml") == cfg


VALID_TEXT = MIN + """\
[machine]
arch = "arm64"
contpte = true
cpus = 2
[experiment]
kind = "fork-under-load"
[tasks.t]
process = "parent"
program = [{ op = "loop", times = 2, body = [{ op = "access", region = "heap", count = 5 }] }]
[sweep]
"machine.fork_mode" = ["batched", "legacy"]
"""


@st.composite
def _mutated(draw: st.DrawFn) -> str:
    text = VALID_TEXT
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        if draw(st.booleans()) and i < len(text):
            text = text[:i] + text[i + 1:]
        else:
            text = text[:i] + draw(st.sampled_from('"=[]{},.#\n 0-x')) + text[i:]
    return text


def test_valid_text_is_valid(tmp_path: Path) -> None:
    path = tmp_path / "valid.toml"
    path.write_text(VALID_TEXT)
    assert load_config(path).sweep == {"machine.fork_mode": ["batched", "legacy"]}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | _mutated())
def test_hypothesis_text(text: str, tmp_path: Path) -> None:
    path = tmp_path / "text.toml"
    path.write_text(text, encoding="utf-8")
    _loads_or_config_error(lambda: load_config(path), str(path))


def test_costs_path_is_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "mine.toml").write_text('name = "mine"\narch = "arm64"\n[ns]\npte_writes = 7.0\n')
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[machine]\narch = "arm64"\ncosts = "mine.toml"\n[processes.parent.regions.h]\nsize = "4MiB"\n')
    from mmuemu.experiment import cost_model

    assert cost_model(load_config(cfg_file)).ns["pte_writes"] == 7.0
    cfg_file.write_text('[machine]\ncosts = "other.toml"\n')
    with pytest.raises(ConfigError, match=r"machine\.costs"):
        load_config(cfg_file)


def test_a_string_addr_names_a_region_in_every_action(tmp_path: Path) -> None:
    body = ('[processes.p.regions.h]\nsize = "4MiB"\n[experiment]\nkind = "program"\n'
            '[tasks.t]\nprocess = "p"\nprogram = [{op = "madvise", addr = "h", advice = "dontneed"}, '
            '{op = "mprotect", addr = "%s", prot = "r"}]\n')
    good = tmp_path / "good.toml"
    good.write_text(body % "h")
    load_config(good)
    bad = tmp_path / "bad.toml"
    bad.write_text(body % "hh")
    with pytest.raises(ConfigError, match=r"tasks\.t\.program\.1\.addr = 'hh': no such region.*did you mean 'h'"):
        load_config(bad)
