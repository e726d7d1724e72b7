"""Which constrained-decoding engine lorag uses, by measurement (see docs/benchmarks.md).

    .venv/bin/pip install xgrammar outlines-core   # the two compared with llguidance (lorag's), not lorag's dependencies
    .venv/bin/python bench/grammar.py               # ~1 min on 2 cores

On SmolLM2's tokenizer (49,152 tokens), for each engine installed: the tokenizer set-up; per
schema, the compile time (cold: each engine's cache is cleared or bypassed) and the time per token
of walking a valid answer (fill the next-token mask, apply it to a logits row, accept the token),
median of 3 walks after a first one (llguidance and xgrammar build lazily: the first walk is shown
apart); and whether each engine refuses a schema it cannot follow (`not`, `if`) or follows it
wrongly. "hostile" is 200 properties of nested alternations: what a client could send to stall a
replica.
"""

import json
import statistics
import time
from pathlib import Path

import torch

from lorag.models import load_tokenizer, resolve_model

SCHEMAS = {
    "answer": {"type": "object", "properties": {"answer": {"type": "string"}, "citations": {"type": "array", "items": {"type": "integer"}},
                                                "confidence": {"type": "number"}}, "required": ["answer", "citations", "confidence"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "ticket": {"type": "object", "properties": {"id": {"type": "string", "pattern": "^TW-[A-Z][0-9]{3}$"}, "severity": {"enum": ["low", "medium", "high"]},
                                                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}},
                   "required": ["id", "severity", "tags"], "additionalProperties": False},
        "steps": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}, "text": {"type": "string", "maxLength": 80}},
                                             "required": ["n", "text"], "additionalProperties": False}}},
        "required": ["ticket", "steps"], "additionalProperties": False},
    "hostile": {"type": "object", "properties": {f"f{i}": {"type": "string", "pattern": "^(a|b|c){1,40}(d|e){1,40}$"} for i in range(200)},
                "required": [f"f{i}" for i in range(200)]},
    "unsupported (not)": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}, "required": ["a"]},
    "unsupported (if)": {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}},
}
ANSWERS = {"answer": {"answer": "Replace the battery fan within 30 days.", "citations": [1, 2], "confidence": 0.8},
           "nested": {"ticket": {"id": "TW-E417", "severity": "high", "tags": ["fan", "battery"]}, "steps": [{"n": 1, "text": "Power off"}, {"n": 2, "text": "Call support"}]}}


def llguidance_engine(tok):
    import llguidance
    import llguidance.hf

    from lorag.grammar import OPTIONS, _fill

    lt = llguidance.hf.from_tokenizer(tok)

    def compile(schema):
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=OPTIONS)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lt)
        if failed:
            raise ValueError(messages[0])
        return grammar

    def walk(grammar, ids, logits):
        m = llguidance.LLMatcher(lt, grammar, log_level=0)
        mask = torch.full((1, (lt.vocab_size + 31) // 32), -1, dtype=torch.int32)
        for t in ids:
            _fill(m, mask, 0)
            bits = ((mask[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[: logits.shape[1]]
            logits[0].masked_fill_(bits == 0, float("-inf"))
            if not m.consume_token(t):
                return False
        return True

    return compile, walk


def xgrammar_engine(tok):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))

    def compile(schema):
        compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True, separators=(",", ":"))

    def walk(compiled, ids, logits):
        m, mask = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, info.vocab_size)
        for t in ids:
            m.fill_next_token_bitmask(mask, 0)
            xgr.apply_token_bitmask_inplace(logits, mask)
            if not m.accept_token(t):
                return False
        return True

    return compile, walk


def outlines_engine(tok):
    from outlines_core import Guide, Index, Vocabulary, json_schema

    vocab: dict[str, list[int]] = {}
    for token, i in tok.get_vocab().items():
        if i != tok.eos_token_id:
            vocab.setdefault(token, []).append(i)
    vocabulary = Vocabulary(tok.eos_token_id, vocab)

    def compile(schema):
        return Index(json_schema.build_regex_from_schema(json.dumps(schema)), vocabulary)

    def walk(index, ids, logits):
        guide = Guide(index)
        for t in ids:
            allowed = torch.tensor(guide.get_tokens())
            row = torch.full_like(logits[0], float("-inf"))
            row[allowed] = logits[0, allowed]
            if t not in set(allowed.tolist()):
                return False
            guide.advance(t)
        return True

    return compile, walk


def main() -> None:
    torch.set_num_threads(2)
    tok = load_tokenizer(resolve_model("smollm2-135m-instruct", Path.home() / ".cache" / "lorag"))
    engines = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_engine}
    print(f"bench/grammar.py: SmolLM2-135M tokenizer ({len(tok)} tokens), 2 threads\n")
    print("| engine | tokenizer set-up | " + " | ".join(f"{name}: compile" for name in SCHEMAS) + " | answer: ms/token (first walk) | nested: ms/token (first walk) |")
    print("| --- " * (len(SCHEMAS) + 4) + "|")
    for name, make in engines.items():
        try:
            t = time.perf_counter()
            compile, walk = make(tok)
            setup = time.perf_counter() - t
        except ImportError:
            print(f"| {name} | not installed | " + " | ".join("-" for _ in SCHEMAS) + " | - | - |")
            continue
        cells, compiled = [], {}
        for schema_name, schema in SCHEMAS.items():
            t = time.perf_counter()
            try:
                compiled[schema_name] = compile(schema)
                cells.append(f"{1000 * (time.perf_counter() - t):.0f} ms" + (" (accepted)" if "unsupported" in schema_name else ""))
            except Exception as e:  # noqa: BLE001 - each engine raises its own type
                cells.append(f"refused in {1000 * (time.perf_counter() - t):.0f} ms: {str(e)[:40]}")
        walks = []
        for schema_name in ANSWERS:
            ids = tok.encode(json.dumps(ANSWERS[schema_name], separators=(",", ":")), add_special_tokens=False)
            times = []
            for _ in range(4):
                logits = torch.zeros(1, len(tok))
                t = time.perf_counter()
                ok = walk(compiled[schema_name], ids, logits)
                times.append((time.perf_counter() - t) / len(ids))
                assert ok, (name, schema_name)
            walks.append(f"{1000 * statistics.median(times[1:]):.2f} ({1000 * times[0]:.1f})")
        print(f"| {name} | {setup:.2f} s | " + " | ".join(cells) + " | " + " | ".join(walks) + " |", flush=True)


if __name__ == "__main__":
    main()
