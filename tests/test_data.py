"""The Ray Data ingest pipeline into real Milvus (Lite and a server): incremental, exact, failure-tolerant, searchable.

Chunking and parsing are tested as tables in test_documents.py; fusion and BM25 in test_retrieval.py.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lorag.chunking import DocumentChunker

ERROR_CODE = "TW-E417"  # an identifier dense embeddings blur but full-text search matches exactly


def expected_chunks(cfg, kb_name: str, embedder_path: Path) -> int:
    """What the collection must hold: every chunk of every current document, counted independently of Milvus."""
    from lorag.data import fingerprint
    from lorag.documents import find_documents

    kb = cfg.knowledge_base(kb_name)
    chunker = DocumentChunker(kb.name, kb.chunking.size, kb.chunking.overlap, str(embedder_path), fingerprint(cfg, kb))
    total = 0
    for path in find_documents(kb.sources):
        rows = chunker({"path": path, "bytes": Path(path).read_bytes()})
        total += sum(1 for r in rows if not r["error"])
    return total


@pytest.fixture(scope="module")
def handbook(ray_session, tmp_path_factory, tiny_model, model_cache) -> Path:
    """A project (its lorag.yaml) whose handbook is ingested into Milvus Lite once, for the tests
    that only search it (an ingest costs tens of seconds); tests that change documents make their own."""
    from conftest import write_config
    from lorag.data import ingest

    root = tmp_path_factory.mktemp("handbook")
    ingest(write_config(root, tiny_model, model_cache), "handbook")
    return root / "lorag.yaml"


@pytest.mark.slow
def test_ingest_is_incremental_exact_and_searchable(ray_session, make_config, embedder_path):
    from lorag.data import ingest
    from lorag.embed import Embedder
    from lorag.handle import open_store
    from lorag.retrieval import search

    cfg = make_config()
    first = ingest(cfg, "handbook")
    assert first.documents == 8 and first.skipped == 0 and not first.failed
    assert first.entities == first.chunks_written == expected_chunks(cfg, "handbook", embedder_path) > 8
    again = ingest(cfg, "handbook")
    assert (again.skipped, again.chunks_written, again.chunks_removed) == (8, 0, 0), "an unchanged corpus is skipped whole"
    assert again.entities == first.entities

    # Editing one document re-indexes only it; deleting one removes its chunks.
    corpus = Path(cfg.knowledge_base("handbook").sources[0])
    (corpus / "08-firmware.md").unlink()
    overview = corpus / "01-overview.md"
    overview.write_text(overview.read_text() + "\n\n## Added later\n\n" + "The T4 ships in a recycled cardboard box. " * 30)
    third = ingest(cfg, "handbook")
    assert third.documents == 7 and third.skipped == 6, "only the edited document is re-indexed"
    assert third.entities == expected_chunks(cfg, "handbook", embedder_path), "the collection holds exactly the current documents' chunks"
    assert third.chunks_removed > 0

    kb = cfg.knowledge_base("handbook")
    store, emb = open_store(cfg.milvus_uri(kb)), Embedder(embedder_path)
    cases = {  # question -> a fact only the right passages contain
        "How long do I hold the reset button to factory-reset the Tidewell T4?": "12 seconds",
        "How long is the Tidewell T4 warranty?": "39",
        "What colour does the status LED pulse during a backup?": "amber",
    }
    for question, fact in cases.items():
        for mode in ("dense", "hybrid"):
            hits = search(store, kb, question, emb, 3, mode)
            assert any(fact in h["text"] for h in hits[:2]), f"{mode} {question!r}: no top-2 hit has {fact!r}: {[h['text'][:80] for h in hits]}"
            assert hits[0]["score"] >= hits[-1]["score"]
            h = hits[0]
            assert open(h["source"]).read()[h["start"] : h["end"]] == h["text"], "citation offsets point at the chunk in the source file"
            assert h["section"], "each hit names the section it comes from"


@pytest.mark.slow
def test_full_text_and_hybrid_find_an_exact_identifier_that_dense_misses(handbook, embedder_path):
    from lorag.config import load_config
    from lorag.embed import Embedder
    from lorag.handle import open_store
    from lorag.retrieval import search

    cfg = load_config(handbook)
    kb = cfg.knowledge_base("handbook")
    store, emb = open_store(cfg.milvus_uri(kb)), Embedder(embedder_path)
    has_code = lambda hit: f"{ERROR_CODE}:" in hit["text"]  # noqa: E731  the error-code list entry itself
    dense = search(store, kb, ERROR_CODE, emb, 3, "dense")
    assert not any(map(has_code, dense)), "premise: dense search misses the error-code entry"
    assert has_code(search(store, kb, ERROR_CODE, emb, 3, "bm25")[0]), "full text ranks the exact identifier first"
    for question in (ERROR_CODE, f"I'm getting {ERROR_CODE}.", f"What does error {ERROR_CODE} mean?"):
        hybrid = search(store, kb, question, emb, 3, "hybrid")
        assert has_code(hybrid[0]), f"hybrid (score fusion, as the quickstart sets it) keeps it first for {question!r}: {[h['text'][:60] for h in hybrid]}"
    only = search(store, kb, "backup", emb, 5, "hybrid", source_prefix=str(Path(kb.sources[0]) / "04-"))
    assert only and all(Path(h["source"]).name.startswith("04-") for h in only), "the source filter keeps only matching paths"


@pytest.mark.slow
def test_bad_documents_are_reported_and_skipped_and_other_formats_index(ray_session, make_config):
    from lorag.data import ingest

    cfg = make_config()
    corpus = Path(cfg.knowledge_base("handbook").sources[0])
    (corpus / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\ngarbage")
    (corpus / "faq.html").write_text("<html><head><title>Harbor FAQ</title><script>var x=1;</script></head><body><h1>Harbor FAQ</h1><p>Harbor keeps 30 daily versions &amp; 12 monthly ones.</p></body></html>")
    (corpus / "notes.jsonl").write_text(json.dumps({"title": "Dock tip", "text": "The DOCK port charges phones at 15 W."}) + "\n" + "{oops\n")
    (corpus / "tips.jsonl").write_text(json.dumps({"title": "Quiet mode", "text": "Hold MODE for 3 seconds to dim all LEDs."}) + "\n")
    r = ingest(cfg, "handbook")
    failed = {Path(p).name: reason for p, reason in r.failed}
    assert set(failed) == {"broken.pdf", "notes.jsonl"}, r.failed
    assert "PDF" in failed["broken.pdf"] and "line 2" in failed["notes.jsonl"], failed
    assert r.documents == 12 and r.entities > 0

    from lorag.handle import open_store

    store = open_store(cfg.milvus_uri(cfg.knowledge_base("handbook")))
    docs = store.documents(cfg.knowledge_base("handbook").collection)
    names = {Path(p).name for p in docs}
    assert {"faq.html", "tips.jsonl"} <= names and not {"broken.pdf", "notes.jsonl"} & names
    again = ingest(cfg, "handbook")
    assert again.skipped == 10 and len(again.failed) == 2, "failed documents are retried (and reported) on every run"


@pytest.mark.slow
def test_a_killed_ingest_rerun_holds_exactly_the_full_count(tmp_path, tiny_model, model_cache, embedder_path):
    """SIGKILL a running `python -m jobs.ingest` (driver, Ray, Milvus Lite owner) after its first
    writes; the same command again ends with every chunk exactly once."""
    from conftest import REPO, write_config
    from lorag.milvus import MilvusStore

    # 40-token chunks: three write batches of 256 from a small corpus (embedding is most of this test's time).
    overrides = ["knowledge_bases.handbook.chunking.size=40", "knowledge_bases.handbook.chunking.overlap=5"]
    cfg = write_config(tmp_path, tiny_model, model_cache, overrides)
    corpus = tmp_path / "corpus"
    words = (corpus / "05-error-codes.md").read_text().split()
    for i in range(12):
        (corpus / f"gen-{i:02d}.md").write_text(f"# Generated {i}\n\n" + " ".join(words[(i * 7) % 50 :] * 2))
    cmd = [sys.executable, "-m", "jobs.ingest", "--config", str(tmp_path / "lorag.yaml"), *[a for o in overrides for a in ("--set", o)]]
    job = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in job.stdout:
        seen.append(line)
        if "chunks written" in line:
            os.killpg(job.pid, signal.SIGKILL)
            break
    job.wait()
    assert job.returncode == -signal.SIGKILL, "".join(seen[-30:])

    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    kb = cfg.knowledge_base("handbook")
    store = MilvusStore(cfg.milvus_uri(kb))
    docs = store.documents(kb.collection)
    assert store.count(kb.collection) == expected_chunks(cfg, "handbook", embedder_path), "no chunk missing, none duplicated"
    assert all(d["count"] == d["n_chunks"] for d in docs.values()) and len(docs) == 20


def test_a_store_handle_reopens_a_dead_lite_owner_with_the_data_intact(ray_session, tmp_path):
    """A Lite file's owner actor dies with its creator's last handle (CI once lost a Train run to a
    name lookup that landed in that teardown; an ingest job exiting under a Serve replica does the
    same). A handle that meets its owner dead reopens it, sync and async."""
    import asyncio

    from lorag.handle import open_store

    store = open_store(str(tmp_path / "kb.db"))
    store.ensure_collection("c", 4)
    rows = [
        {"id": f"d#{i}", "text": f"chunk {i}", "source": "d.md", "title": "D", "section": "", "chunk_index": i,
         "start": 0, "end": 1, "doc_hash": "h", "n_chunks": 3, "vector": [1.0, float(i), 0.0, 0.5]}
        for i in range(3)
    ]
    assert store.upsert("c", rows) == 3
    first = store._actor
    ray_session.kill(first)
    assert store.count("c") == 3
    assert store._actor._actor_id != first._actor_id
    ray_session.kill(store._actor)
    assert len(asyncio.run(store.acandidates("c", None, "chunk", 3))[1]) == 3, "the async form reopens the killed owner too"
    # The name is free again once its owner is gone: a fresh handle starts a new owner on the same file.
    ray_session.kill(store._actor)
    assert open_store(str(tmp_path / "kb.db")).count("c") == 3


@pytest.mark.slow
def test_lite_and_a_milvus_server_give_the_same_top_hits(handbook, embedder_path, tmp_path):
    from lorag.config import load_config
    from lorag.data import ingest
    from lorag.embed import Embedder
    from lorag.handle import open_store
    from lorag.standalone import local_server
    from lorag.retrieval import search

    lite_cfg = load_config(handbook)
    emb = Embedder(embedder_path)
    queries = ["How long is the Tidewell T4 warranty?", "What colour does the status LED pulse during a backup?", ERROR_CODE, "Harbor cloud prices"]
    with local_server(tmp_path / "milvus-server") as uri:
        server_cfg = load_config(handbook, [f"knowledge_bases.handbook.uri={uri}"])  # the same documents (and so chunk ids)
        first = ingest(server_cfg, "handbook")
        assert first.entities == expected_chunks(server_cfg, "handbook", embedder_path)
        assert ingest(server_cfg, "handbook").skipped == 8, "re-ingest against the server skips unchanged documents too"
        lite, server = open_store(lite_cfg.milvus_uri(lite_cfg.knowledge_bases[0])), open_store(uri)
        for q in queries:
            for mode in ("dense", "bm25", "hybrid"):
                a = search(lite, lite_cfg.knowledge_bases[0], q, emb, 3, mode)
                b = search(server, server_cfg.knowledge_bases[0], q, emb, 3, mode)
                assert a[0]["id"] == b[0]["id"], f"{mode} {q!r}: Lite top hit {a[0]['text'][:60]!r} != server's {b[0]['text'][:60]!r}"
                if mode == "dense":
                    assert [h["id"] for h in a] == [h["id"] for h in b]
                    assert a[0]["score"] == pytest.approx(b[0]["score"], abs=1e-3)


@pytest.mark.parametrize(
    "messages, hits, changed_index",
    [
        ([{"role": "user", "content": "q"}], [], None),
        ([{"role": "system", "content": "s"}], [{"title": "t", "text": "x"}], None),
        ([{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "q2"}], [{"title": "T", "text": "fact"}], 2),
    ],
)
def test_augment_wraps_only_the_last_user_turn(messages, hits, changed_index):
    from lorag.prompts import augment

    out = augment(messages, hits)
    assert len(out) == len(messages)
    for i, (a, b) in enumerate(zip(messages, out)):
        if i == changed_index:
            assert b["content"].endswith("Question: " + a["content"]) and "[1] T\nfact" in b["content"]
        else:
            assert a == b


def test_embedding_actor_threads_follow_the_config(ray_session, embedder_path):
    """Under Ray an actor reserving one CPU gets one torch thread; `embed_threads` overrides it on CPU."""
    from lorag.embed import Embedder

    @ray_session.remote(num_cpus=1)
    class Probe:
        def load(self, threads):
            """Load an embedder as an ingest actor does; return torch's threads after it and what it embeds."""
            import torch

            emb = Embedder(embedder_path, device="cpu", threads=threads)
            return torch.get_num_threads(), emb.embed(["a probe"]).shape

    probe = Probe.remote()  # one actor (each costs a process, torch and the model): Ray's default first, then the override
    assert ray_session.get(probe.load.remote(None)) == (1, (1, 384))
    assert ray_session.get(probe.load.remote(2)) == (2, (1, 384))


def _take_lock(store, collection: str, thief: dict) -> None:
    """Take `collection`'s ingest lock from whoever holds it, as an ingest that judged it stale would."""
    holder = store.lock(collection, thief)
    assert holder and holder["token"] != thief["token"], f"premise: the lock is held by someone else: {holder}"
    store.unlock(collection, holder["token"])
    assert store.lock(collection, thief) is None, "the thief holds the lock"


def test_a_lock_taken_away_is_lost_loudly(tmp_path):
    """The renewal that finds another holder marks the lease lost: `check` raises from then on, and
    so does the end of the block, whose own release leaves the new holder's lock alone."""
    import time

    from lorag.handle import StoreHandle
    from lorag.lease import LockLost, ingest_lock
    from lorag.milvus import MilvusStore

    milvus = MilvusStore(str(tmp_path / "kb.db"))
    store = StoreHandle(store=milvus)
    try:
        with pytest.raises(LockLost, match=r"knowledge base 'kb': this ingest lost its lock '_lorag_lock_\w+' at .*then run it again"):
            with ingest_lock(store, "kb_c", "kb", renew_every=0.05) as lease:
                lease.check()  # held: no error
                _take_lock(store, "kb_c", {"token": "thief"})
                deadline = time.time() + 60
                while not lease.lost and time.time() < deadline:
                    time.sleep(0.05)
                assert lease.lost, "a renewal must find the lock held by another"
                with pytest.raises(LockLost):
                    lease.check()
        assert store.lock("kb_c", {"token": "probe"})["token"] == "thief", "the new holder's lock is left alone"
    finally:
        milvus.close()


@pytest.mark.slow
def test_an_ingest_whose_lock_is_taken_stops_before_deleting(ray_session, make_config, embedder_path):
    """Another ingest takes the lock while this one writes (as one would after judging it stale):
    this ingest stops with LockLost instead of pruning, so the chunks of a deleted document, which
    the other ingest may still need, stay; the other's lock stays too."""
    from lorag.data import ingest
    from lorag.handle import open_store
    from lorag.lease import LockLost

    cfg = make_config()
    kb = cfg.knowledge_base("handbook")
    ingest(cfg, "handbook")
    store = open_store(cfg.milvus_uri(kb), kb.token)
    before = set(store.document_index(kb.collection))
    corpus = Path(kb.sources[0])
    (corpus / "08-firmware.md").unlink()
    overview = corpus / "01-overview.md"
    overview.write_text(overview.read_text() + "\n\nAdded later: the T4 ships in a recycled cardboard box.\n")
    thief = {"token": "thief", "kb": kb.name, "host": "elsewhere", "pid": 1, "since": 0.0}

    def take_once(written, done, total):
        if store.lock(kb.collection, {"token": "probe"}).get("token") != "thief":
            _take_lock(store, kb.collection, thief)

    with pytest.raises(LockLost, match="'handbook': this ingest lost its lock"):
        ingest(cfg, "handbook", progress=take_once)
    assert set(store.document_index(kb.collection)) == before, "nothing was pruned after the lock was lost"
    assert store.lock(kb.collection, {"token": "probe"})["token"] == "thief"
    store.unlock(kb.collection, "thief")
    assert ingest(cfg, "handbook").chunks_removed > 0, "with the lock free again, the next ingest prunes the deleted document"


ADAPTER = {"role": "system", "content": "Be a pirate."}
CLIENT = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "q"}


@pytest.mark.parametrize(
    "messages, system_prompt, mode, expected",
    [
        ([USER], None, "follow", [USER]),
        ([], "Be a pirate.", "follow", []),
        ([USER], "Be a pirate.", "follow", [ADAPTER, USER]),
        ([USER], "Be a pirate.", "replace", [ADAPTER, USER]),
        ([CLIENT, USER], "Be a pirate.", "follow", [{"role": "system", "content": "Be a pirate.\n\nBe brief."}, USER]),
        ([CLIENT, USER], "Be a pirate.", "replace", [CLIENT, USER]),
        ([ADAPTER, USER], "Be a pirate.", "follow", [ADAPTER, USER]),  # the same prompt is not repeated
        ([USER, CLIENT], "Be a pirate.", "follow", [ADAPTER, USER, CLIENT]),  # a later system message stays where it is
        ([CLIENT, USER], None, "follow", [CLIENT, USER]),
    ],
)
def test_with_system_table(messages, system_prompt, mode, expected):
    """The adapter's system prompt and a conversation's own (`serve.client_system_message`)."""
    from lorag.prompts import with_system

    assert with_system(messages, system_prompt, mode) == expected
