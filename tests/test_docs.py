"""The docs cannot drift from the CLI: every `lorag ...` command shown in README.md, docs/*.md, k8s/README.md
and the usage comments of examples/** parses against the real Typer app, and every `--set KEY=VALUE` in one
names a real config field.

What is checked, per doc file (one test each, so a failure names the file, its line and click's own message):

- shell code blocks (```bash, sh, shell, console, and untagged blocks that start with a command) and the
  `# Label:  lorag ...` usage comments of example files. Backslash continuations are joined; `FOO=bar `
  prefixes, `.venv/bin/`, `# comments`, `$ ` prompts and `&&`/`;`/`|` chains are handled; `[--opt VALUE]`
  optional parts are unbracketed and checked too.
- each command is parsed, never run: the click command of `lorag.cli.app` is walked group by group
  (`make_context` + `resolve_command`) down to the leaf, whose `make_context` raises on an unknown command or
  option, a missing required argument or option, or a bad choice. Placeholders (HOST, JOB_ID, KEY) are fine as
  values. No path option of the CLI has `exists=True` today, so any path (a placeholder too) parses; if one
  gets it, the check runs from the repository root, as the docs' commands do, and a path missing there fails.
- each `--set`/`-s KEY=VALUE` is applied with `lorag.config.apply_override` to the command's `-c/--config` file
  when it exists (else examples/quickstart/lorag.yaml) and the result validated by `LoragConfig`: an unknown key
  (or a list item the file does not have, or a key below a plain value) fails; a value the field rejects (a
  placeholder) does not, since only the key has to exist.
- inline code spans of the Markdown files that start with `lorag WORD` must name real (sub)commands (they are
  often partial, like `lorag submit`, so only the command names are checked).

Nothing here starts Ray or loads a model: importing lorag.cli is cheap (checked below), and the test takes
well under a second.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import typer.main
import yaml

REPO = Path(__file__).resolve().parents[1]
FALLBACK_CONFIG = REPO / "examples" / "quickstart" / "lorag.yaml"

SHELL_TAGS = {"bash", "sh", "shell", "console", "zsh", "shell-session"}
# First words that make an untagged code block a shell block (diagrams and file trees do not start with one).
SHELL_WORDS = {"lorag", "kubectl", "ray", "make", "export", "python", "python3", "serve", "curl", "docker", "pip", "cd", "git", "helm", "openssl"}
EXAMPLE_SUFFIXES = {".yaml", ".yml", ".jsonl", ".json", ".py", ".sh", ".toml"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
REDIRECTS = {">", ">>", "<", ">&", "<&", "&>", ">|"}
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# `[--threshold 0.3]`: an optional part, bracketed at word boundaries (`--set k=[1,2]` is a YAML list, kept).
OPTIONAL_PART = re.compile(r"(?:(?<=\s)|^)\[([^\[\]]+)\](?=\s|$)")
# A usage comment: `# lorag ...` or `# Label:   lorag ...`; `# lorag eval: the share of ...` is prose.
USAGE_COMMENT = re.compile(r"^\s*(?:[A-Za-z][\w -]*:\s+)?(?P<cmd>(?:[A-Za-z_]\w*=\S*\s+)*(?:\S*/)?lorag\s+(?!\S*:(?:\s|$)).*)$")
# After a usage comment's command, two spaces then a parenthesis open a remark: `(or: make demo)`.
COMMENT_REMARK = re.compile(r"\s{2,}\(.*$")
INLINE_SPAN = re.compile(r"(?<!`)`(?!`)((?:\S*/)?lorag [^`]+)`(?!`)")


def doc_files() -> list[Path]:
    files = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "k8s" / "README.md"]
    files += sorted(p for p in (REPO / "examples").rglob("*") if p.is_file() and p.suffix in EXAMPLE_SUFFIXES)
    return [p for p in files if p.is_file()]


# -- extraction ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    line: int  # 1-based line of the command's first physical line
    text: str  # the shell text it came from (for messages)
    args: tuple[str, ...]  # the arguments after `lorag`


def strip_comment(line: str) -> str:
    """Drop a shell `# comment`: a '#' at a word start, outside quotes (`http://a#b` keeps its '#')."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def unbracket(line: str) -> str:
    """`a [--b C [--d E]]` -> `a --b C --d E`: optional parts are checked as if given."""
    while True:
        new = OPTIONAL_PART.sub(r"\1", line)
        if new == line:
            return line
        line = new


def lorag_commands(line: str) -> list[tuple[str, ...]]:
    """The argument lists of the `lorag` commands on one joined shell line (others are ignored)."""
    lex = shlex.shlex(unbracket(strip_comment(line)), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = ""
    try:
        tokens = list(lex)
    except ValueError:  # unbalanced quotes: not a shell line we can read
        return []
    segments: list[list[str]] = [[]]
    skip = False
    for i, tok in enumerate(tokens):
        if skip:
            skip = False
        elif tok in SEPARATORS:
            segments.append([])
        elif tok in REDIRECTS:
            skip = True  # its target
        elif tok.isdigit() and i + 1 < len(tokens) and tokens[i + 1] in REDIRECTS:
            pass  # the `2` of `2>&1`
        else:
            segments[-1].append(tok)
    found = []
    for seg in segments:
        while seg and ENV_ASSIGNMENT.match(seg[0]):
            seg = seg[1:]
        if seg[:1] and (seg[0] == "lorag" or seg[0].endswith("/lorag")):
            found.append(tuple(seg[1:]))
        elif len(seg) >= 3 and Path(seg[0]).name.startswith("python") and seg[1:3] == ["-m", "lorag.cli"]:
            found.append(tuple(seg[3:]))
    return found


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    joined: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for no, text in lines:
        if pending is not None:
            no, text = pending[0], pending[1] + " " + text.lstrip()
            pending = None
        if text.rstrip().endswith("\\"):
            pending = (no, text.rstrip()[:-1])
        else:
            joined.append((no, text))
    if pending is not None:
        joined.append(pending)
    return joined


def _starts_with_command(text: str) -> bool:
    words = text.strip().removeprefix("$ ").split()
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    return bool(words) and (words[0] in SHELL_WORDS or Path(words[0]).name in SHELL_WORDS)


def _is_shell_block(tag: str, body: list[tuple[int, str]]) -> bool:
    if tag:
        return tag in SHELL_TAGS
    first = next((t for _, t in body if t.strip() and not t.strip().startswith("#")), "")
    return _starts_with_command(first)


def markdown_shell_lines(text: str) -> list[tuple[int, str]]:
    """(line, joined shell line) of every shell code block of a Markdown text."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    tag = ""
    body: list[tuple[int, str]] = []
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if fence is None:
            m = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if m:
                fence, tag, body = m.group(1), m.group(2).lower(), []
            continue
        if stripped.startswith(fence) and not stripped[len(fence):].strip():
            if _is_shell_block(tag, body):
                if any(t.lstrip().startswith("$ ") for _, t in body):  # a console session: commands are the prompted lines
                    body = [(n, t.lstrip()[2:]) for n, t in body if t.lstrip().startswith("$ ")]
                out += _join_continuations(body)
            fence = None
            continue
        body.append((no, line))
    return out


def markdown_inline_spans(text: str) -> list[tuple[int, str]]:
    """(line, text) of inline code spans outside fenced blocks that start with `lorag `."""
    outside = []
    fence = None
    for line in text.splitlines():
        stripped = line.lstrip()
        m = re.match(r"(`{3,}|~{3,})", stripped)
        if fence is None and m:
            fence = m.group(1)
            outside.append("")
        elif fence is not None:
            if stripped.startswith(fence) and not stripped[len(fence):].strip():
                fence = None
            outside.append("")
        else:
            outside.append(line)
    prose = "\n".join(outside)
    return [(prose.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())) for m in INLINE_SPAN.finditer(prose)]


def comment_usage_lines(text: str, python: bool = False, data: bool = False) -> list[tuple[int, str]]:
    """(line, shell text) of the `lorag ...` usage lines in a file's comments (and, for Python, its docstrings)."""
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        body = None
        if "#" in line and (not data or line.lstrip().startswith("#")):  # a JSONL record's text may hold a '#'
            body = line[line.index("#") + 1 :]
        if python and line.lstrip().startswith(("lorag ", ".venv/bin/lorag ")):
            body = line
        if body is None:
            continue
        m = USAGE_COMMENT.match(body)
        if m:
            out.append((no, COMMENT_REMARK.sub("", m.group("cmd")).rstrip()))
    return out


def extract(path: Path) -> list[Command]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        lines = markdown_shell_lines(text)
    else:
        lines = comment_usage_lines(text, python=path.suffix == ".py", data=path.suffix in (".jsonl", ".json"))
    return [Command(no, shell.strip(), args) for no, shell in lines for args in lorag_commands(shell)]


# -- checking -----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def root_command():
    from lorag.cli import app

    return typer.main.get_command(app)


def _errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(exit exceptions, usage exceptions) of click and of the click that typer may vendor (typer >= 0.29:
    `typer._click`, whose exceptions derive from `typer.exceptions.TyperException`)."""
    exits: list[type] = [typer.Exit]
    usage: list[type] = []
    for mod in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        exits += [c for c in (getattr(m, "Exit", None),) if isinstance(c, type)]
        usage += [c for c in (getattr(m, "ClickException", None), getattr(m, "TyperException", None)) if isinstance(c, type)]
    return tuple(exits), tuple(usage)


@contextlib.contextmanager
def _chdir(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _is_group(cmd) -> bool:
    return hasattr(cmd, "resolve_command") and hasattr(cmd, "commands")


def _option(cmd, flag: str):
    return next((p for p in cmd.params if getattr(p, "param_type_name", "") == "option" and flag in p.opts), None)


def parse(args: tuple[str, ...]):
    """Parse `lorag ARGS` as the CLI would, down to the leaf command, without invoking anything.
    Returns (leaf command, its context), or a string: the group that was left without a command."""
    cmd = root_command()
    # From the repository root, as the docs are run (a path option with exists=True would check it there);
    # --help prints, so stdout and stderr are swallowed.
    with _chdir(REPO), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ctx = cmd.make_context("lorag", list(args), resilient_parsing=False)
        while _is_group(cmd):
            rest = [*ctx._protected_args, *ctx.args]
            if not rest:
                return f"`{ctx.command_path}` needs a command"
            name, sub, rest = cmd.resolve_command(ctx, rest)
            cmd = sub
            ctx = sub.make_context(name, rest, parent=ctx, resilient_parsing=False)
    return cmd, ctx


def _resolved_path(data: dict, key: str) -> tuple:
    """The override's key as a pydantic error location: list items named by `name` become indices."""
    loc: list = []
    node = data
    for part in key.split("."):
        if isinstance(node, list):
            idx = int(part) if part.isdigit() else next(i for i, it in enumerate(node) if isinstance(it, dict) and it.get("name") == part)
            loc.append(idx)
            node = node[idx]
        else:
            loc.append(part)
            node = node.get(part) if isinstance(node, dict) else None
    return tuple(loc)


def check_override(config: Path, item: str) -> str | None:
    """None when ITEM's key is a real field of CONFIG's tree, else why not. The value may be a placeholder."""
    from pydantic import ValidationError

    from lorag.config import ConfigError, LoragConfig, apply_override

    data = yaml.safe_load(config.read_text()) or {}
    try:
        LoragConfig.model_validate(copy.deepcopy(data))
    except ValidationError as e:
        return f"{config.relative_to(REPO)} itself is not a valid config: {e}"
    try:
        apply_override(data, item)  # a malformed item, a missing list item, a key below a value
    except ConfigError as e:
        return str(e)
    loc = _resolved_path(data, item.partition("=")[0])
    try:
        LoragConfig.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            at = tuple(err["loc"])
            if err["type"] == "extra_forbidden" and loc[: len(at)] == at:
                return f"unknown key {'.'.join(map(str, at))} (in {config.relative_to(REPO)})"
            if len(at) < len(loc) and loc[: len(at)] == at and err["type"].endswith("_type"):
                return f"{'.'.join(map(str, at))} is a value, not a section ({err['msg']})"
        # Anything else is the value's problem (e.g. a placeholder): only the key has to exist.
    return None


def check(args: tuple[str, ...]) -> str | None:
    """None when `lorag ARGS` parses against the real CLI and its --set keys exist, else the reason."""
    exits, usage = _errors()
    try:
        parsed = parse(args)
    except exits as e:  # --help and other eager exits
        code = getattr(e, "exit_code", 0)
        return None if code == 0 else f"exits {code}"
    except usage as e:
        if type(e).__name__ == "NoArgsIsHelpError":
            return f"`{e.ctx.command_path if getattr(e, 'ctx', None) else 'lorag'}` needs a command"
        return e.format_message()
    if isinstance(parsed, str):
        return parsed
    cmd, ctx = parsed
    set_opt = _option(cmd, "--set")
    if set_opt is None or not ctx.params.get(set_opt.name):
        return None
    config_opt = _option(cmd, "--config")
    given = ctx.params.get(config_opt.name) if config_opt else None
    config = FALLBACK_CONFIG
    if given is not None and (REPO / given).is_file():
        config = (REPO / given).resolve()
    for item in ctx.params[set_opt.name]:
        problem = check_override(config, item)
        if problem:
            return f"--set {item}: {problem}"
    return None


def check_names(args: tuple[str, ...]) -> str | None:
    """For a partial command (an inline span): do its command words name real (sub)commands?"""
    cmd = root_command()
    path = "lorag"
    for word in args:
        if word.startswith("-"):
            continue
        if not _is_group(cmd):
            return None
        sub = cmd.commands.get(word)
        if sub is None:
            return f"no command `{word}` in `{path}` (commands: {', '.join(sorted(cmd.commands))})"
        cmd, path = sub, f"{path} {word}"
    return None


# -- tests --------------------------------------------------------------------------------------

FILES = doc_files()


def _rel(p: Path) -> str:
    return p.relative_to(REPO).as_posix()


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_doc_commands_parse_against_the_cli(path):
    failures = []
    for c in extract(path):
        problem = check(c.args)
        if problem:
            failures.append(f"{_rel(path)}:{c.line}: {c.text}\n    -> {' '.join(problem.split())}")
    if path.suffix == ".md":
        for no, span in markdown_inline_spans(path.read_text(encoding="utf-8")):
            for args in lorag_commands(span):
                problem = check_names(args)
                if problem:
                    failures.append(f"{_rel(path)}:{no}: `{span}`\n    -> {problem}")
    assert not failures, f"{len(failures)} command(s) in {_rel(path)} do not match the CLI:\n" + "\n".join(failures)


BENCH_LINE = re.compile(r"(?:^|\s)(?:\S*/)?python3? (bench/\w+\.py)([^`\n]*)")


def test_benchmark_commands_in_the_docs_name_real_scripts_and_options():
    """docs/benchmarks.md (and any doc) shows `python bench/X.py --opt ...` lines: each script exists
    and declares each option it is given (argparse's `add_argument("--opt"`), so a renamed flag fails here."""
    seen, failures = 0, []
    for path in FILES:
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for script, rest in BENCH_LINE.findall(line):
                seen += 1
                source = REPO / script
                if not source.is_file():
                    failures.append(f"{_rel(path)}:{no}: {script} does not exist")
                    continue
                declared = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source.read_text()))
                for option in re.findall(r"(?<!\S)(--[\w-]+)", rest.split("#")[0]):
                    if option not in declared:
                        failures.append(f"{_rel(path)}:{no}: {script} has no option {option} (it has {sorted(declared)})")
    assert seen >= 8, f"only {seen} benchmark commands found in the docs"
    assert not failures, "\n".join(failures)


# The extractor must find what is there (lower bounds a little under today's counts), so it cannot
# silently find nothing and pass.
MIN_COMMANDS = {
    "README.md": 20,
    "docs/scaling.md": 5,
    "k8s/README.md": 4,
    "examples/quickstart/lorag.yaml": 5,
    "examples/two-adapters/lorag.yaml": 5,
    "examples/routing/lorag.yaml": 4,
}


def test_the_extractor_finds_the_docs_commands():
    counts = {_rel(p): len(extract(p)) for p in FILES}
    for name, least in MIN_COMMANDS.items():
        assert counts.get(name, 0) >= least, f"only {counts.get(name, 0)} lorag commands found in {name}: {counts}"
    assert sum(counts.values()) >= 40, counts


def test_extraction_rules():
    md = "\n".join([
        "Prose `lorag ingest` here.",
        "```bash",
        "# a comment line",
        "FOO=1 BAR=x .venv/bin/lorag ingest -c a.yaml   # trailing comment",
        "lorag submit train -c a.yaml \\",
        "  --address http://HOST:8265",
        "kubectl apply -f k8s/ && lorag k8s status -c a.yaml",
        "lorag eval -d d.jsonl --routing [--threshold 0.3]",
        "make demo",
        "```",
        "```",
        "lorag.yaml (a diagram, not a command)",
        "```",
        "```",
        "lorag train -c a.yaml",
        "```",
        "```console",
        "$ lorag serve -c a.yaml",
        "lorag is serving at http://127.0.0.1:8000/v1",
        "```",
        "```yaml",
        "# lorag train -c not-a-shell-block.yaml",
        "```",
    ])
    got = [(no, args) for no, shell in markdown_shell_lines(md) for args in lorag_commands(shell)]
    assert got == [
        (4, ("ingest", "-c", "a.yaml")),
        (5, ("submit", "train", "-c", "a.yaml", "--address", "http://HOST:8265")),
        (7, ("k8s", "status", "-c", "a.yaml")),
        (8, ("eval", "-d", "d.jsonl", "--routing", "--threshold", "0.3")),
        (15, ("train", "-c", "a.yaml")),
        (18, ("serve", "-c", "a.yaml")),
    ]
    assert markdown_inline_spans(md) == [(1, "lorag ingest")]
    yml = "\n".join([
        "# lorag quickstart: prose about the example",
        "# Launch:    lorag quickstart                      (or: make demo)",
        "#            lorag ingest -c x.yaml && lorag train -c x.yaml",
        'key: value   # lorag eval: prose again',
        '#            lorag ask "Why?" -m tidewell-support',
    ])
    got = [(no, args) for no, shell in comment_usage_lines(yml) for args in lorag_commands(shell)]
    assert got == [(2, ("quickstart",)), (3, ("ingest", "-c", "x.yaml")), (3, ("train", "-c", "x.yaml")), (5, ("ask", "Why?", "-m", "tidewell-support"))]
    assert lorag_commands("lorag serve --url http://a#b 2>&1 > log  # c") == [("serve", "--url", "http://a#b")]
    assert comment_usage_lines('{"text": "# lorag train is how"}\n# lorag train -c x.yaml', data=True) == [(2, "lorag train -c x.yaml")]
    assert lorag_commands("lorag train --set adapters.0.lora.target_modules=[q_proj,v_proj]") == [("train", "--set", "adapters.0.lora.target_modules=[q_proj,v_proj]")]


KNOWN_BAD = [
    ("lorag trian -c x", "No such command"),
    ('lorag ask -c x "q" -m m', "No such option"),
    ("lorag ask -m m", "Missing argument"),
    ('lorag ask "q"', "Missing option"),
    ("lorag deploy --set a=b -c examples/quickstart/lorag.yaml", "No such option"),
    ("lorag submit ingest --set nosuchkey=1 -c examples/quickstart/lorag.yaml", "unknown key nosuchkey"),
    ("lorag submit deploy -c examples/quickstart/lorag.yaml", "not one of"),
    ("lorag kb", "needs a command"),
    ("lorag jobs logs", "Missing argument"),
    ("lorag eval -c examples/quickstart/lorag.yaml", "Missing option"),
    ("lorag train -c examples/quickstart/lorag.yaml --set serve.prot=8001", "unknown key serve.prot"),
    ("lorag train -c examples/quickstart/lorag.yaml --set adapters.no-such-adapter.train.max_steps=1", "no list item"),
    ("lorag train -c examples/two-adapters/lorag.yaml --set adapters.tidewell-brief.train.max_stesp=1", "unknown key adapters.1.train.max_stesp"),
    ("lorag train -s adapters.0.lora.rank=4", "unknown key adapters.0.lora.rank"),
    ("lorag train --set serve.port.x=1", "is a value, not a section"),
    ("lorag train --set serve.port", "must look like key.path=value"),
    ("lorag kb search q --kb k -k 0", "Invalid value for '-k'"),
]

KNOWN_GOOD = [
    "lorag --help",
    "lorag submit --help",
    "lorag --verbose quickstart",
    'lorag ask "What does error TW-E417 mean?" -m tidewell-support',
    "lorag eval -c examples/routing/lorag.yaml --routing -d examples/routing/routes.jsonl --threshold 0.3",
    "lorag submit ingest -c lorag.yaml --address http://HOST:8265 --set knowledge_bases.0.uri=http://milvus:19530",
    "lorag submit train -c lorag.yaml --set storage=s3://my-bucket/lorag --no-follow",
    "lorag train -c examples/two-adapters/lorag.yaml --set adapters.tidewell-brief.train.max_steps=4",
    "lorag train --set serve.port=not-a-port",  # a bad value for a real key: only the key is checked
    "lorag jobs logs JOB_ID --follow --address http://HOST:8265",
    "lorag deploy -c lorag.yaml --address http://HEAD:8265 --timeout 60",
    "lorag k8s apply -c lorag.yaml --job ingest --job finetune",
    "lorag adapters tag tidewell-support@v1 prod -c examples/quickstart/lorag.yaml",
]


@pytest.mark.parametrize("line,reason", KNOWN_BAD, ids=[b for b, _ in KNOWN_BAD])
def test_the_checker_rejects_known_bad_lines(line, reason):
    (args,) = lorag_commands(line)
    problem = check(args)
    assert problem is not None, f"{line!r} passed the checker"
    assert reason in problem, problem


@pytest.mark.parametrize("line", KNOWN_GOOD)
def test_the_checker_accepts_known_good_lines(line):
    (args,) = lorag_commands(line)
    assert check(args) is None


def test_inline_span_names_are_checked():
    assert check_names(("finetune",)).startswith("no command `finetune`")
    assert check_names(("kb", "serch")).startswith("no command `serch` in `lorag kb`")
    assert check_names(("--verbose", "quickstart")) is None
    assert check_names(("submit",)) is None  # partial commands are fine inline


def test_importing_the_cli_loads_neither_torch_nor_ray():
    code = "import sys, lorag.cli; print(sorted(m for m in ('torch', 'ray', 'transformers', 'pymilvus') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"importing lorag.cli imported {r.stdout.strip()}: the doc check (and `lorag --help`) would be slow"
