"""Every speed lever keeps flashmoe bit-identical to mlx-lm at every prompt position and every
decode step, with slot pools that evict every step, prompts chunked through the pool and
expert parts large enough that io.split really cuts the reads; the packed layout is checked."""
from __future__ import annotations

import json
import shutil

import pytest

from flashmoe.errors import CheckpointError, ConfigError, ExpertReadError
from flashmoe.models.loader import load_resident
from flashmoe.checkpoints.packed import DIRNAME, write_packed
from flashmoe.checkpoints.safetensors_index import CheckpointIndex
from tests.hostile import SlowReader
from tests.parity import assert_exact, budget_for, flashmoe_trace, mlx_lm_trace

PROMPT = [5, 99, 310, 42, 7, 256, 11, 300, 64, 2, 77, 150]
STEPS = 12


@pytest.fixture(scope="module")
def packed(tmp_path_factory, wide):
    """A copy of the wide qwen3_5_moe fixture (128 KiB weight parts) with its packed layout."""
    path = tmp_path_factory.mktemp("levers") / "ckpt"
    shutil.copytree(wide("qwen3_5_moe"), path)
    ref = mlx_lm_trace(path, PROMPT, STEPS)
    res = load_resident(path, CheckpointIndex.open(path), evaluate=False)
    write_packed(res.experts, path / DIRNAME)
    return path, ref


K = 4  # the fixture's experts per token: a pool of K slots is the least a layer needs
LEVERS = [
    {"layout": "original", "cache_policy": "none", "io_split": 2},
    {"layout": "original", "cache_policy": "lru", "slots": K, "io_split": 3},
    {"layout": "original", "cache_policy": "lfu", "slots": K + 1},
    {"layout": "original", "io_readahead": True, "io_split": 2, "slots": K},
    {"layout": "packed", "io_split": 3, "slots": K},
    {"layout": "packed", "io_verify": True, "io_split": 8, "io_threads": 5, "slots": K},
    {"layout": "packed", "io_direct": True, "cache_policy": "none", "io_split": 2},
    {"layout": "original", "io_direct": True, "io_split": 2, "slots": K},
    {"layout": "original", "prefetch": True, "cache_policy": "none"},
    {"layout": "packed", "prefetch": True, "cache_policy": "lru", "slots": 2 * K, "io_split": 2},
]


@pytest.fixture
def direct_from_64k(monkeypatch):
    """io.direct reads experts from 64 KiB on: the fixture's (~0.4 MB) go direct (the real
    threshold, 1 MiB, is above these fixtures' experts)."""
    from flashmoe.stages import expert_fetch

    monkeypatch.setattr(expert_fetch, "DIRECT_MIN_BYTES", 64 * 1024)


@pytest.mark.parametrize("opts", LEVERS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
async def test_every_lever_matches_mlx_lm(packed, opts, direct_from_64k):
    path, ref = packed
    opts = dict(opts)
    if "slots" in opts:
        opts["cache_budget_gb"] = budget_for(path, opts.pop("slots"))
    reader = SlowReader(max_ms=0, scribble=False, short=False)  # counts the reads
    got, engine = await flashmoe_trace(path, PROMPT, STEPS, reader=reader, **opts)
    assert all(s.experts_fetched > 0 for s in engine.totals.steps)  # every step evicts
    assert engine.totals.steps[0].chunks > 0  # the prompt's union is chunked through the pool
    if opts.get("io_split", 1) > 1:
        assert max(reader.sizes) < 128 * 1024  # every 128 KiB weight part was cut
    assert_exact(ref, got)


@pytest.mark.parametrize("split", [2, 4])
async def test_split_cuts_reads_into_more_pieces_and_stays_exact(packed, split):
    """The same run at io.split=1 and at `split`: each 128 KiB weight part read in exactly two
    pieces (pieces stay >= io_pool.MIN_CHUNK, 64 KiB), identical logits."""
    path, ref = packed
    whole, cut = (SlowReader(max_ms=0, scribble=False, short=False) for _ in range(2))
    opts = {"layout": "original", "cache_policy": "none"}
    await flashmoe_trace(path, PROMPT, STEPS, reader=whole, io_split=1, **opts)
    got, _ = await flashmoe_trace(path, PROMPT, STEPS, reader=cut, io_split=split, **opts)
    assert max(whole.sizes) == 128 * 1024 and max(cut.sizes) < 128 * 1024
    weight_parts = whole.sizes.count(128 * 1024)
    assert weight_parts > 0 and cut.calls == whole.calls + weight_parts
    assert_exact(ref, got)


async def test_verify_names_the_corrupt_expert(packed, tmp_path):
    path, _ = packed
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    manifest = json.loads((bad / DIRNAME / "manifest.json").read_text())
    stride = manifest["layers"]["0"]["stride"]
    blob = bad / DIRNAME / "layer_000.bin"
    data = bytearray(blob.read_bytes())
    for e in range(len(manifest["layers"]["0"]["xxh64"])):  # flip a byte in every expert
        data[e * stride + 100] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ExpertReadError, match=r"checksum mismatch: layer 0 expert \d+ in .*layer_000.bin"):
        await flashmoe_trace(bad, PROMPT, 2, layout="packed", io_verify=True)


async def test_stale_or_missing_pack_is_refused(packed, tmp_path):
    path, _ = packed
    stale = tmp_path / "stale"
    shutil.copytree(path, stale)
    manifest = stale / DIRNAME / "manifest.json"
    m = json.loads(manifest.read_text())
    m["source"] = {k: {**v, "size": v["size"] + 1} for k, v in m["source"].items()}
    manifest.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="changed since it was packed"):
        await flashmoe_trace(stale, PROMPT, 1)
    shutil.rmtree(stale / DIRNAME)
    with pytest.raises(CheckpointError, match="pack the checkpoint first"):
        await flashmoe_trace(stale, PROMPT, 1, layout="packed")
    with pytest.raises(ConfigError, match="io_verify=true needs the packed layout"):
        await flashmoe_trace(stale, PROMPT, 1, io_verify=True)


def test_pack_refuses_to_overwrite(packed):
    path, _ = packed
    res = load_resident(path, CheckpointIndex.open(path), evaluate=False)
    with pytest.raises(CheckpointError, match="already exists"):
        write_packed(res.experts, path / DIRNAME)


async def test_pack_of_a_rewritten_same_size_source_is_refused(packed, tmp_path):
    """A fixed revision re-uploaded with the same shapes: same size, same header, new bytes."""
    import os

    from tests.reference import flashmoe_greedy

    path, _ = packed
    stale = tmp_path / "rewritten"
    shutil.copytree(path, stale)
    want, _, _ = await flashmoe_greedy(path, PROMPT, 4, layout="original")
    os.utime(stale / "model.safetensors")  # a copy without its mtime: same bytes, still used
    toks, _, _ = await flashmoe_greedy(stale, PROMPT, 4, layout="packed")
    assert toks == want
    le = next(iter(load_resident(stale, CheckpointIndex.open(stale), evaluate=False)
                   .experts.values()))
    file, offset = le.locate(0, 0)  # the first sampled expert part: its first bytes flipped
    with open(file, "r+b") as f:
        f.seek(offset)
        head = f.read(16)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in head))
    with pytest.raises(CheckpointError, match=r"model.safetensors changed since it was packed "
                       r"\(same size and header, but its expert bytes differ"):
        await flashmoe_greedy(stale, PROMPT, 1)


def test_expert_files_are_read_without_readahead(packed, monkeypatch):
    """io.readahead=false (the default): every expert descriptor is POSIX_FADV_RANDOM, so a
    read fetches its own range only; =true leaves the kernel's readahead on."""
    import os

    from flashmoe.runtime.expert_store import ExpertStore

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform: reads are left as they are")
    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, off, n, adv: (advised.append((fd, adv)), real(fd, off, n, adv)))
    path, _ = packed
    experts = load_resident(path, CheckpointIndex.open(path), evaluate=False).experts
    for readahead in (False, True):
        advised.clear()
        store = ExpertStore(experts, readahead=readahead)
        try:
            want = [] if readahead else [(fd, os.POSIX_FADV_RANDOM) for fd in store.fds]
            assert advised == want and store.fds
        finally:
            store.close()


@pytest.mark.parametrize("threshold, direct", [(64 * 1024, True), (None, False)])
async def test_direct_reads_only_large_experts_and_stays_exact(packed, monkeypatch, threshold,
                                                                direct):
    """io.direct: experts of DIRECT_MIN_BYTES or more are read O_DIRECT (every range of them),
    smaller ones (the real 1 MiB is above this fixture's) buffered."""
    from flashmoe.stages import expert_fetch

    if threshold is not None:
        monkeypatch.setattr(expert_fetch, "DIRECT_MIN_BYTES", threshold)
    path, ref = packed
    reader = SlowReader(max_ms=0, scribble=False, short=False)
    got, _ = await flashmoe_trace(path, PROMPT, STEPS, layout="original", io_direct=True,
                                  cache_policy="none", reader=reader)
    assert_exact(ref, got)
    assert reader.direct and all(d == direct for d in reader.direct)


async def test_direct_bounce_holds_one_fetch_not_one_row_per_slot(packed, direct_from_64k):
    """io.direct reads into a bounce buffer borrowed per fetch: its rows are that fetch's misses
    (at most a layer's experts), not one per slot (the linux_cpu cache is ~1,100 slots of
    7 MB: 8 GB of unswappable shared pages); a fetch's copy out of it is part of its time."""
    path, ref = packed
    slots = 64
    got, engine = await flashmoe_trace(path, PROMPT, STEPS, layout="original", io_direct=True,
                                       cache_budget_gb=budget_for(path, slots))
    assert_exact(ref, got)
    fetch = engine.pipeline.fetch
    experts = max(le.num_experts for le in engine.store.layers.values())
    bounces = [b for idle in fetch._bounce.values() for b in idle]
    assert bounces and all(b.n <= experts for b in bounces)
    assert all(p.n >= slots > experts for p in fetch.pools.values())
    assert all(s.expert_fetch_ms > 0 for s in engine.totals.steps if s.experts_fetched)
