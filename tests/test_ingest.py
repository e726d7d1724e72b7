"""Ingest always finishes or fails, and never loses or touches data it should not (issue 15, items 4 and 5).

Run: `.venv/bin/python -m pytest -q tests/test_ingest.py`. Real Ray, real Milvus Lite and a real
Milvus server (`lorag.standalone.local_server`); the CPU shapes run in their own Ray in a subprocess.
"""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from conftest import REPO

CAFE = "caf\u00e9.md"


def write_kb_config(root: Path, model_cache: Path, kbs: list[dict], overrides: list[str] | None = None):
    """A lorag.yaml in `root` holding only knowledge bases (chunks of 40 tokens), loaded."""
    from lorag.config import load_config

    for kb in kbs:
        kb.setdefault("chunking", {"size": 40, "overlap": 5})
    data = {"base_model": "smollm2-135m-instruct", "embedder": "all-minilm-l6-v2", "workdir": "work", "cache_dir": str(model_cache), "knowledge_bases": kbs}
    (root / "lorag.yaml").write_text(yaml.safe_dump(data, allow_unicode=True))
    return load_config(root / "lorag.yaml", overrides)


def write_doc(path: Path, title: str, sentences: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n" + " ".join(f"{title} sentence {i} says the backup runs at {i} o'clock." for i in range(sentences)) + "\n")


def expected(cfg, kb_name: str, embedder_path: Path) -> dict[str, int]:
    """Chunks per document of the knowledge base's current files, counted without Milvus."""
    from lorag.data import fingerprint, kb_documents
    from lorag.chunking import DocumentChunker

    kb = cfg.knowledge_base(kb_name)
    chunker = DocumentChunker(kb.name, kb.chunking.size, kb.chunking.overlap, str(embedder_path), fingerprint(cfg, kb))
    return {p: sum(1 for r in chunker({"path": p, "bytes": Path(p).read_bytes()}) if not r["error"]) for p in kb_documents(kb)}


def stored(store, kb) -> dict[str, int]:
    """Chunks per document in the collection, keyed by the full path (recovered from the source hash)."""
    from lorag.data import kb_documents
    from lorag.chunks import source_key

    paths = {source_key(p): p for p in kb_documents(kb)}
    return {paths.get(k, d["source"]): d["count"] for k, d in store.document_index(kb.collection).items()}


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory):
    from lorag.standalone import local_server

    with local_server(tmp_path_factory.mktemp("milvus-server")) as uri:
        yield uri


# -- stage sizing: every stage fits in what Ray has free -------------------------------------------


@pytest.mark.parametrize(
    "embed_actors, free_cpus, free_gpus, use_gpu, plan, source_bytes, node_cpus",
    [
        # (chunker CPUs, embedders, CPUs each, GPUs each, torch threads each)
        (None, 2.0, 0, False, (0.25, 2, 0.75, 0.0, 1), None, None),  # 2 cores, defaults: one single-threaded embedder per core
        (2, 2.0, 0, False, (0.25, 2, 0.75, 0.0, 1), None, None),  # the issue-26 regression: one embedder on one thread here
        (1, 2.0, 0, False, (0.25, 1, 1.5, 0.0, 2), None, None),  # one embedder holds (and uses) the rest
        (None, 1.0, 0, False, (0.12, 1, 0.76, 0.0, 1), None, None),  # one core: chunker and embedder share it
        (4, 1.0, 0, False, (0.12, 1, 0.76, 0.0, 1), None, None),  # more embedders asked for than fit: one
        (None, 16.0, 0, False, (0.25, 8, 1.93, 0.0, 2), None, None),  # unset: at most 8
        (32, 16.0, 0, False, (0.25, 16, 0.96, 0.0, 1), None, None),  # every core but the chunker's share
        (2, 3.5, 0, False, (0.25, 2, 1.5, 0.0, 2), None, None),
        (1, 0.3, 0, False, (0.03, 1, 0.24, 0.0, 1), None, None),  # a fraction free: fractions
        (1, 0.0, 0, False, (0.12, 1, 0.76, 0.0, 1), None, None),  # nothing free: ask for one CPU (it waits, or the stall timeout fires)
        (4, 4.0, 2, True, (0.25, 2, 1.0, 1.0, 1), None, None),  # one GPU per embedder, up to the GPUs free
        (None, 4.0, 2, True, (0.25, 2, 1.0, 1.0, 1), None, None),
        (None, 8.0, 0, False, (0.25, 2, 3.75, 0.0, 4), 1_500_000, None),  # unset, 1.5 MB to index: two actors, each with half
        (None, 8.0, 0, False, (0.25, 1, 7.5, 0.0, 8), 3_000, None),  # unset, a few small documents: one model load, every thread
        (None, 6.0, 0, False, (0.25, 1, 2.5, 0.0, 3), 3_000, 3.0),  # two 3-CPU nodes: one actor must fit on one of them
        (4, 4.0, 0, True, (0.25, 1, 1.0, 1.0, 1), None, None),  # GPUs busy: one embedder waits for one
    ],
)
def test_stages_are_sized_to_fit_what_ray_has_free(embed_actors, free_cpus, free_gpus, use_gpu, plan, source_bytes, node_cpus):
    from lorag.data import plan_stages

    p = plan_stages(embed_actors, free_cpus, free_gpus, use_gpu, source_bytes, node_cpus)
    assert (p.chunker_cpus, p.embed_actors, p.embed_cpus, p.embed_gpus, p.embed_threads) == plan
    if free_cpus > 0:
        # the chunker, one read task and every embedder at once, or one waits for another forever
        assert 2 * p.chunker_cpus + p.embed_actors * p.embed_cpus <= free_cpus + 1e-9
        assert p.embed_cpus <= (node_cpus or free_cpus), "an actor runs on one node"


# -- 1, 2 and 3 documents on 1 and 2 CPUs --------------------------------------------------------

SHAPES = """
import json, sys
import ray
from lorag.config import load_config
from lorag.data import ingest

out = []
for config, num_cpus, mode in json.loads(sys.argv[1]):  # one Ray after another, in one process
    cfg = load_config(config)
    if mode == "shapes":
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
        got = {}
        for kb in cfg.knowledge_bases:
            r = ingest(cfg, kb.name)
            got[kb.name] = [r.documents, r.chunks_written, r.entities, len(r.failed)]
    else:  # stall: the one GPU is held by another actor, so the embedder can never start
        ray.init(num_cpus=num_cpus, num_gpus=1, include_dashboard=False, logging_level="ERROR")
        holder = ray.remote(num_gpus=1)(type("GpuHolder", (), {"ready": lambda self: True})).remote()
        ray.get(holder.ready.remote())
        try:
            ingest(cfg, cfg.knowledge_bases[0].name)
            got = {"finished": True}
        except TimeoutError as e:
            got = {"stalled": str(e)}
    ray.shutdown()
    out.append(got)
print("RESULT " + json.dumps(out), flush=True)
"""


def run_in_own_ray(runs: list[tuple[Path, int, str]]) -> list[dict]:
    """Each (config, num_cpus, mode) in a fresh local Ray of that many CPUs, in one subprocess
    (never the test session's Ray); one process for all saves starting Python, torch and Ray each time."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO / "platform"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    arg = json.dumps([[str(c), n, mode] for c, n, mode in runs])
    r = subprocess.run([sys.executable, "-c", SHAPES, arg], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    lines = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
    assert r.returncode == 0 and lines, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


SHAPE_CPUS = (1, 2)


@pytest.fixture(scope="module")
def own_ray_runs(tmp_path_factory, model_cache):
    """Knowledge bases of 1, 2 and 3 documents ingested on 1 and on 2 CPUs, and one stalled ingest:
    (configs, results), from one subprocess."""
    configs, runs = {}, []
    for num_cpus in SHAPE_CPUS:
        root = tmp_path_factory.mktemp(f"shapes-{num_cpus}cpu")
        kbs = []
        for n, name in enumerate(["one", "two", "three"], 1):
            for i in range(n):
                write_doc(root / name / f"doc{i}.md", f"{name.title()} {i}", 2 + 3 * i)
            kbs.append({"name": name, "sources": [f"{name}/"]})
        configs[num_cpus] = write_kb_config(root, model_cache, kbs)
        runs.append((root / "lorag.yaml", num_cpus, "shapes"))
    root = tmp_path_factory.mktemp("stall")
    write_doc(root / "docs" / "a.md", "Alpha", 3)
    write_kb_config(root, model_cache, [{"name": "stuck", "sources": ["docs/"], "stall_timeout_s": 20}])
    runs.append((root / "lorag.yaml", 2, "stall"))
    results = run_in_own_ray(runs)
    return configs, dict(zip([*SHAPE_CPUS, "stall"], results))


@pytest.mark.slow
@pytest.mark.parametrize("num_cpus", SHAPE_CPUS)
def test_one_two_and_three_documents_finish_on_one_and_two_cpus(own_ray_runs, embedder_path, num_cpus):
    """The issue's hang: two small documents on a 2-core machine never finished, because the actor
    pools held every CPU and the read waited for one. Each shape must finish with exact counts."""
    configs, results = own_ray_runs
    cfg, got = configs[num_cpus], results[num_cpus]
    for n, name in enumerate(["one", "two", "three"], 1):
        chunks = sum(expected(cfg, name, embedder_path).values())
        assert got[name] == [n, chunks, chunks, 0], f"{name} on {num_cpus} CPU(s): [documents, written, stored, failed] = {got[name]}, want {[n, chunks, chunks, 0]}"


@pytest.mark.slow
def test_a_stalled_pipeline_fails_naming_the_stage(own_ray_runs):
    """The embedder needs the cluster's one GPU, which another actor holds: the ingest must end
    with an error naming the embedder stage after stall_timeout_s, not wait forever."""
    got = own_ray_runs[1]["stall"]
    assert "stalled" in got, got
    msg = got["stalled"]
    assert "'stuck'" in msg and "Embedder" in msg and "stall_timeout_s" in msg and "GPU" in msg, msg


# -- data safety ---------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["lite", "server"])
def test_non_ascii_and_long_paths_are_edited_and_deleted_with_exact_counts(ray_session, tmp_path, model_cache, embedder_path, backend, request):
    """`café.md` went into filters as `caf\\u00e9.md`, which Milvus Lite rejects: its edit and delete
    failed and left duplicates. A path longer than the `source` field (2,048 bytes) was stored
    clipped and re-added on every run. Both must be skipped, edited and deleted exactly."""
    from lorag.data import ingest
    from lorag.chunks import SOURCE_MAX
    from lorag.handle import open_store

    corpus = tmp_path / "corpus"
    write_doc(corpus / CAFE, "Caf\u00e9", 6)
    write_doc(corpus / "plain.md", "Plain", 3)
    deep = corpus.joinpath(*[f"{'d' * 200}{i}" for i in range(11)]) / "long.md"
    write_doc(deep, "Long", 4)
    assert len(str(deep).encode()) > SOURCE_MAX, "premise: the path is longer than the source field"
    overrides = [f"knowledge_bases.accents.uri={request.getfixturevalue('milvus_server')}"] if backend == "server" else []
    cfg = write_kb_config(tmp_path, model_cache, [{"name": "accents", "sources": ["corpus/"]}], overrides)
    kb = cfg.knowledge_base("accents")
    store = open_store(cfg.milvus_uri(kb), kb.token)

    first = ingest(cfg, "accents")
    want = expected(cfg, "accents", embedder_path)
    assert (first.documents, first.failed) == (3, []) and stored(store, kb) == want and first.entities == sum(want.values())

    again = ingest(cfg, "accents")
    assert (again.skipped, again.chunks_written, again.chunks_removed) == (3, 0, 0), "unchanged documents, the long path included, are skipped"

    write_doc(corpus / CAFE, "Caf\u00e9 revised", 2)  # fewer chunks than before: the old ones must go
    edited = ingest(cfg, "accents")
    want = expected(cfg, "accents", embedder_path)
    assert edited.skipped == 2 and stored(store, kb) == want and edited.entities == sum(want.values()), "the edit replaced the old chunks"
    assert edited.chunks_removed > 0

    (corpus / CAFE).unlink()
    deep.unlink()
    deleted = ingest(cfg, "accents")
    want = expected(cfg, "accents", embedder_path)
    assert list(want) == [str(corpus / "plain.md")]
    assert stored(store, kb) == want and deleted.entities == sum(want.values()), "both deleted documents lost every chunk"


def test_colliding_collection_names_are_rejected_at_load(tmp_path, model_cache):
    from lorag.config import ConfigError

    cfg = write_kb_config(tmp_path, model_cache, [{"name": n, "sources": ["."]} for n in ("team-a", "team.a", "team_a")])
    names = [kb.collection for kb in cfg.knowledge_bases]
    assert len(set(names)) == 3, f"team-a, team.a and team_a must get three collections: {names}"
    assert all(n.startswith("kb_team_a_") for n in names)

    with pytest.raises(ConfigError, match=r"knowledge_bases\.1\.milvus_collection: 'b' and 'a' would share Milvus collection 'docs'"):
        write_kb_config(tmp_path, model_cache, [{"name": "a", "sources": ["."], "milvus_collection": "docs"}, {"name": "b", "sources": ["."], "milvus_collection": "docs"}])
    # The same collection name on two different servers is two collections.
    write_kb_config(tmp_path, model_cache, [
        {"name": "a", "sources": ["."], "milvus_collection": "docs", "uri": "http://one:19530"},
        {"name": "b", "sources": ["."], "milvus_collection": "docs", "uri": "http://two:19530"},
    ])
    with pytest.raises(ConfigError, match=r"milvus_collection"):
        write_kb_config(tmp_path, model_cache, [{"name": "a", "sources": ["."], "milvus_collection": "_lorag_lock_x"}])


@pytest.mark.slow
def test_similar_names_keep_their_documents_apart(ray_session, tmp_path, model_cache, embedder_path):
    from lorag.data import ingest
    from lorag.handle import open_store

    write_doc(tmp_path / "a" / "a.md", "Team A", 3)
    write_doc(tmp_path / "b" / "b.md", "Team B", 5)
    cfg = write_kb_config(tmp_path, model_cache, [{"name": "team-a", "sources": ["a/"]}, {"name": "team_a", "sources": ["b/"]}])
    for name in ("team-a", "team_a"):
        ingest(cfg, name)
    store = open_store(cfg.milvus_uri(cfg.knowledge_bases[0]))
    for name in ("team-a", "team_a"):
        kb = cfg.knowledge_base(name)
        assert stored(store, kb) == expected(cfg, name, embedder_path), f"{name} holds exactly its own documents"
    assert ingest(cfg, "team-a").skipped == 1
    assert stored(store, cfg.knowledge_base("team_a")) == expected(cfg, "team_a", embedder_path), "re-ingesting team-a left team_a alone"


def test_a_foreign_collection_is_never_written_or_dropped(ray_session, tmp_path, model_cache, milvus_server):
    """On a shared Milvus server a collection under the knowledge base's name that lorag did not
    create (no marker) is somebody else's data: ingest refuses before writing, drop refuses."""
    from pymilvus import DataType, MilvusClient

    from lorag.data import ingest
    from lorag.milvus import ForeignCollection, MilvusStore

    write_doc(tmp_path / "docs" / "a.md", "Alpha", 3)
    cfg = write_kb_config(tmp_path, model_cache, [{"name": "theirs", "sources": ["docs/"], "uri": milvus_server}])
    kb = cfg.knowledge_base("theirs")
    client = MilvusClient(uri=milvus_server)
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("pk", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=2)
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="AUTOINDEX", metric_type="L2")
    client.create_collection(kb.collection, schema=schema, index_params=index, consistency_level="Strong")
    client.insert(kb.collection, [{"pk": i, "embedding": [float(i), 1.0]} for i in range(5)])

    with pytest.raises(ForeignCollection, match="was not created by lorag"):
        ingest(cfg, "theirs")
    store = MilvusStore(milvus_server)
    with pytest.raises(ForeignCollection):
        store.drop(kb.collection, kb.name)
    fields = [f["name"] for f in client.describe_collection(kb.collection)["fields"]]
    assert fields == ["pk", "embedding"], "its schema is untouched"
    assert client.query(kb.collection, filter="", output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"] == 5, "its rows are untouched"

    # A lorag collection made for another knowledge base (a second config mapping to it) is refused too.
    store.ensure_collection("kb_other", 384, "other")
    with pytest.raises(ForeignCollection, match="holds knowledge base 'other'"):
        store.ensure_collection("kb_other", 384, "mine")
    with pytest.raises(ForeignCollection):
        store.drop("kb_other", "mine")
    assert store.owner("kb_other") == "other"
    store.drop("kb_other", "other")
    assert not client.has_collection("kb_other")


@pytest.mark.slow
def test_an_empty_source_root_is_refused_not_pruned(ray_session, tmp_path, model_cache, embedder_path):
    from lorag.data import ingest
    from lorag.handle import open_store

    write_doc(tmp_path / "local" / "a.md", "Local", 3)
    write_doc(tmp_path / "share" / "b.md", "Shared", 3)
    cfg = write_kb_config(tmp_path, model_cache, [{"name": "mounted", "sources": ["local/", "share/"]}])
    kb = cfg.knowledge_base("mounted")
    before = ingest(cfg, "mounted").entities
    assert before == sum(expected(cfg, "mounted", embedder_path).values())

    (tmp_path / "share" / "b.md").unlink()  # the share is unmounted: its directory is there, empty
    with pytest.raises(FileNotFoundError, match=r"source '.*share' is present but holds no document"):
        ingest(cfg, "mounted")
    assert open_store(cfg.milvus_uri(kb)).count(kb.collection) == before, "nothing was deleted"


@pytest.mark.slow
def test_files_out_of_the_root_and_oversized_documents_are_reported_not_read(ray_session, tmp_path, model_cache, embedder_path):
    """Issue 25: `corpus/leak.txt -> /proc/self/environ` was ingested and served, and no size
    limit held. A link out of the source root is reported and never read, and chunks it left from
    before are removed; a document over max_source_bytes is reported and keeps its last good
    chunks. (FIFOs and devices: test_documents; a link to /dev/zero would exhaust memory here.)"""
    from lorag.data import ingest
    from lorag.handle import open_store

    corpus, private = tmp_path / "corpus", tmp_path / "private"
    write_doc(corpus / "a.md", "Alpha", 3)
    write_doc(corpus / "big.md", "Big", 6)
    write_doc(corpus / "turns.md", "Turns", 3)  # a regular file now, a link out of the root later
    write_doc(private / "secret.md", "Secret", 3)
    (corpus / "leak.md").symlink_to(private / "secret.md")
    cfg = write_kb_config(tmp_path, model_cache, [{"name": "guarded", "sources": ["corpus/"]}])
    kb = cfg.knowledge_base("guarded")
    store = open_store(cfg.milvus_uri(kb))

    first = ingest(cfg, "guarded")
    assert [(Path(p).name, r.split(",")[0]) for p, r in first.failed] == [("leak.md", f"resolves to {os.path.realpath(private / 'secret.md')}")]
    assert first.documents == 4 and stored(store, kb) == expected(cfg, "guarded", embedder_path)
    big_chunks = stored(store, kb)[str(corpus / "big.md")]

    (corpus / "turns.md").unlink()
    (corpus / "turns.md").symlink_to(private / "secret.md")
    write_doc(corpus / "big.md", "Big revised", 12)
    cfg = write_kb_config(tmp_path, model_cache, [{"name": "guarded", "sources": ["corpus/"], "max_source_bytes": (corpus / "big.md").stat().st_size - 1}])
    second = ingest(cfg, "guarded")
    failed = {Path(p).name: r for p, r in second.failed}
    assert set(failed) == {"leak.md", "turns.md", "big.md"}, second.failed
    assert "max_source_bytes" in failed["big.md"] and "outside its source root" in failed["turns.md"]
    assert second.documents == 4 and second.skipped == 1
    docs = store.documents(kb.collection)
    assert docs[str(corpus / "big.md")]["count"] == big_chunks, "the oversized document keeps the chunks of its last good ingest"
    assert set(docs) == {str(corpus / "a.md"), str(corpus / "big.md")}, "the link out of the root is not read, and its old chunks are gone"


@pytest.mark.slow
def test_a_second_ingest_of_a_running_knowledge_base_is_refused(ray_session, tmp_path, model_cache, embedder_path):
    """Two ingests of one knowledge base at once: the second is refused with a message naming the
    first, the first finishes, and the collection holds every chunk exactly once."""
    from lorag.data import ingest
    from lorag.handle import open_store
    from lorag.milvus import StoreLocked

    for i in range(3):
        write_doc(tmp_path / "docs" / f"d{i}.md", f"Doc {i}", 4)
    cfg = write_kb_config(tmp_path, model_cache, [{"name": "busy", "sources": ["docs/"]}])
    inside, release = threading.Event(), threading.Event()
    result: dict = {}

    def first_progress(chunks, done, total):
        inside.set()  # the first ingest is writing, lock held
        release.wait(timeout=600)

    def first():
        try:
            result["report"] = ingest(cfg, "busy", progress=first_progress)
        finally:
            inside.set()

    t = threading.Thread(target=first)
    t.start()
    try:
        assert inside.wait(timeout=600) and "report" not in result
        with pytest.raises(StoreLocked, match=rf"'busy' is being ingested by pid {os.getpid()} on .*wait for that ingest to finish"):
            ingest(cfg, "busy")
    finally:
        release.set()
        t.join()
    want = sum(expected(cfg, "busy", embedder_path).values())
    assert result["report"].entities == want
    kb = cfg.knowledge_base("busy")
    again = ingest(cfg, "busy")
    assert (again.skipped, again.entities) == (3, want), "the lock was released: the next ingest runs"
    assert open_store(cfg.milvus_uri(kb)).count(kb.collection) == want


def test_a_lock_left_by_a_dead_or_silent_holder_is_taken_over(milvus_server):
    """The lock lives in Milvus, so it spans processes and hosts: a live holder refuses others;
    a killed holder on this host, or one elsewhere that stopped renewing, is taken over."""
    import socket
    import time

    from lorag.handle import StoreHandle
    from lorag.lease import LOCK_LEASE_S, ingest_lock
    from lorag.milvus import MilvusStore, StoreLocked, lock_collection

    milvus = MilvusStore(milvus_server)
    store = StoreHandle(store=milvus)
    code = f"import os, sys; sys.path.insert(0, {str(REPO / 'platform')!r}); from lorag.milvus import MilvusStore; from lorag.lease import ingest_lock; from lorag.handle import StoreHandle\n" \
           f"held = ingest_lock(StoreHandle(store=MilvusStore({milvus_server!r})), 'kb_locked', 'locked')\nheld.__enter__()\nos._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)  # takes the lock and dies without releasing it
    holder = store.lock("kb_locked", {"token": "probe"})
    assert holder["host"] == socket.gethostname() and holder["token"] != "probe", "premise: the dead process's lock is there"
    with ingest_lock(store, "kb_locked", "locked"):  # its holder is dead: taken over at once
        with pytest.raises(StoreLocked, match=rf"pid {os.getpid()}"):
            with ingest_lock(store, "kb_locked", "locked"):
                pass
    assert not milvus.client.has_collection(lock_collection("kb_locked")), "released on exit"

    elsewhere = {"token": "far", "host": "another-host", "pid": 1, "since": time.time()}
    assert store.lock("kb_locked", elsewhere) is None
    with pytest.raises(StoreLocked, match="by pid 1 on another-host"):
        with ingest_lock(store, "kb_locked", "locked"):
            pass
    milvus.client.alter_collection_properties(lock_collection("kb_locked"), properties={"lorag.lock.renewed": str(time.time() - LOCK_LEASE_S - 1)})
    with ingest_lock(store, "kb_locked", "locked"):  # not renewed for a lease: taken over
        assert store.lock("kb_locked", {"token": "probe"})["pid"] == os.getpid()
