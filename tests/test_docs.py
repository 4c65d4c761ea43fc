"""The repository's text speaks of the project only: no work-tracking vocabulary in any tracked file; every file a
Markdown page or a YAML comment cites exists; docs/benchmarks.md and README.md's methods table are what
`make benchmarks-doc` generates from the result JSONs; every study under experiments/ has a README and uses only the
public API (names a stepdistill package lists in its ``__all__``)."""

from __future__ import annotations

import ast
import fnmatch
import glob
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stepdistill.eval import benchmarks_doc

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------ vocabulary

# Words that belong to how the work was organised, not to the project: they go stale and mean nothing to a reader.
FORBIDDEN = {  # the words are assembled so that this file does not contain them
    "work period": re.compile(r"\b" + "sess" + r"ions?\b", re.IGNORECASE),
    "tracker number": re.compile(r"\b" + "iss" + r"ues?\s+#?\d+|\b" + "iss" + r"ue's\b", re.IGNORECASE),
    "tracker item": re.compile(r"\b" + "tick" + r"ets?\b", re.IGNORECASE),
    "current day": re.compile(r"\b" + "to" + r"day\b", re.IGNORECASE),
    "commit hash": re.compile(r"\bcommit(?:ted)?\s+[0-9a-f]{7,}\b", re.IGNORECASE),
    "bare hash": re.compile(r"\b[0-9a-f]{40}\b", re.IGNORECASE),
}

# Legitimate uses the patterns above would otherwise flag: a flagged line that also matches one of these passes.
ALLOWED = [
    # a client object in code (the requests and aiohttp client classes), not a period of work
    re.compile(r"\b(?:requests|aiohttp)\.\w*[S]ession\b"),
    # a journal citation: a volume followed by its number
    re.compile(r"\bvol(?:ume)?\.?\s*\d+\s*,?\s*" + "iss" + r"ue\s+\d+", re.IGNORECASE),
    # a checksum the line names as SHA-1
    re.compile(r"\bsha-?1\b", re.IGNORECASE),
]


def _tracked_text_files() -> list[Path]:
    """Every file git tracks, or would track (untracked but not ignored), except binary files and assets/."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = []
    for name in sorted(set(filter(None, listed))):
        path = REPO / name
        if name.startswith("assets/") or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def offending_lines(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, line) for every line that uses a forbidden word and no allowed phrase."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if any(allowed.search(line) for allowed in ALLOWED):
            continue
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                found.append((number, what, line.strip()))
    return found


def test_each_pattern_catches_an_example_and_the_allow_list_lets_legitimate_uses_through():
    # the examples are assembled so that this file does not contain them
    s, i, t, d = "sess" + "ion", "iss" + "ue", "tick" + "et", "to" + "day"
    hex7, hex40 = "adca24c", "0123456789abcdef" * 2 + "01234567"
    examples = {
        "work period": f"Measured in {s} 21 on 2 CPU cores.",
        "tracker number": f"the rule of {i} 14",
        "tracker item": f"see the {t} for details",
        "current day": f"this machine was slow {d}",
        "commit hash": f"a fresh clone of commit {hex7}",
        "bare hash": f"checked out at {hex40}",
    }
    for what, example in examples.items():
        assert [w for _, w, _ in offending_lines(example)] == [what], example
    assert offending_lines(f"as the {i}'s text says")
    assert offending_lines(f"Before commit{'t' + 'ed'} {hex7} it failed")  # "committed" too
    assert offending_lines(f"{i} #7")
    legitimate = [f"GitHub {i}s and pull requests", f"an {i} the recipe's header states", "commit() the folder",
                  f"client = requests.{s.title()}()", f"Journal of X, vol. 3, {i} 2", f"SHA-1 {hex40}",
                  "a 64-hex sha256 " + "ab" * 32]
    for line in legitimate:
        assert offending_lines(line) == [], line


def test_no_tracked_file_uses_work_tracking_words():
    offenders = [f"{path.relative_to(REPO)}:{number}: {what}: {line[:120]}"
                 for path in _tracked_text_files()
                 for number, what, line in offending_lines(path.read_text(encoding="utf-8"))]
    assert offenders == [], "\n".join(offenders)


# ---------------------------------------------------------------------------------------------- cited files

PREFIXES = ("stepdistill/", "training/", "pipelines/", "eval/", "docs/", "experiments/", "tests/", "assets/",
            "../shared/")
CITATION = re.compile(r"(?<![\w./-])((?:" + "|".join(re.escape(p) for p in PREFIXES)
                      + r")[\w./<>*{},-]*|DESIGN\.md|OBJECTIVES\.md)")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _expand_braces(text: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", text)
    if not match:
        return [text]
    return [out for part in match.group(1).split(",")
            for out in _expand_braces(text[:match.start()] + part + text[match.end():])]


def cited_paths(text: str) -> list[str]:
    """Repository-relative paths cited in ``text`` (placeholders such as ``<method>`` become ``*``)."""
    paths = []
    for match in CITATION.finditer(text):
        path = match.group(1).rstrip(".,;:")
        if path.count("{") != path.count("}"):
            path = path.split("{")[0]
        paths += [re.sub(r"<[^<>]*>", "*", p) for p in _expand_braces(path)]
    return paths


def _exists(path: str) -> bool:
    target = (REPO / path).resolve()
    if not target.is_relative_to(REPO):
        return False  # outside the repository: a reader of a clone cannot open it
    if any(c in path for c in "*?["):
        return bool(glob.glob(str(REPO / path)))
    return target.exists()


def _cited_in(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        return [p for line in text.splitlines() if "#" in line for p in cited_paths(line.split("#", 1)[1])]
    return cited_paths(text)


def test_citation_finder_reads_paths_globs_placeholders_and_the_missing_design_files():
    text = ("see `training/toy-dmd.yaml`, training/toy-<method>.yaml and eval/results/toy-sid/dropout-{before,after}-*.json "
            "(DESIGN.md §4, ../shared/OBJECTIVES.md); not tianweiy/DMD2/experiments/x.sh nor ../eval/results/x.json.")
    assert cited_paths(text) == ["training/toy-dmd.yaml", "training/toy-*.yaml",
                                 "eval/results/toy-sid/dropout-before-*.json", "eval/results/toy-sid/dropout-after-*.json",
                                 "DESIGN.md", "../shared/OBJECTIVES.md"]
    assert [_exists(p) for p in cited_paths(text)] == [True, True, True, True, False, False]
    assert cited_paths("# objective: dmd  # stepdistill/objectives/nothing_here.py") == [
        "stepdistill/objectives/nothing_here.py"]
    assert not _exists("stepdistill/objectives/nothing_here.py")


def test_every_file_cited_in_markdown_and_yaml_comments_exists():
    missing = []
    for path in _tracked_text_files():
        if path.suffix not in (".md", ".yaml", ".yml"):
            continue
        rel = path.relative_to(REPO)
        missing += [f"{rel}: {cited}" for cited in _cited_in(path) if not _exists(cited)]
        if path.suffix == ".md":  # relative Markdown links resolve against the page's own folder
            for target in LINK.findall(path.read_text(encoding="utf-8")):
                if re.match(r"[a-z]+:|#", target):
                    continue
                resolved = (path.parent / target.split("#")[0]).resolve()
                if not resolved.is_relative_to(REPO) or not resolved.exists():
                    missing.append(f"{rel}: link {target}")
    assert missing == [], "\n".join(missing)


# ------------------------------------------------------------------------------------- generated documents

def test_benchmarks_doc_and_readme_table_are_what_the_generator_writes(tmp_path):
    readme = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", readme)
    out = tmp_path / "benchmarks.md"
    assert benchmarks_doc.main(["--repo", str(REPO), "--out", str(out), "--readme", str(readme)]) == 0
    assert out.read_text(encoding="utf-8") == (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8"), (
        "docs/benchmarks.md is out of date: run `make benchmarks-doc`")
    assert readme.read_text(encoding="utf-8") == (REPO / "README.md").read_text(encoding="utf-8"), (
        "README.md's methods table is out of date: run `make benchmarks-doc`")
    assert benchmarks_doc.main(["--repo", str(REPO), "--out", str(out), "--readme", str(readme), "--check"]) == 0
    out.write_text("stale\n", encoding="utf-8")
    assert benchmarks_doc.main(["--repo", str(REPO), "--out", str(out), "--readme", str(readme), "--check"]) == 1


def test_every_table_row_of_benchmarks_md_names_its_source_json():
    text = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    body = [row for row in rows if not row.startswith("| source |")]
    assert len(body) > 100
    for row in body:
        match = re.match(r"\| \[[^\]]+\]\(\.\./([^)]+\.json)\) \|", row)
        assert match and (REPO / match.group(1)).is_file(), row


def test_readme_methods_table_figures_come_from_the_named_entries():
    table = benchmarks_doc.methods_table(REPO)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert benchmarks_doc.TABLE_BEGIN + "\n" + table + "\n" + benchmarks_doc.TABLE_END in readme
    assert len(readme.splitlines()) <= 200
    for page in re.findall(r"\(docs/methods/([\w.-]+\.md)\)", table):
        assert (REPO / "docs" / "methods" / page).is_file(), page
    # a figure is the JSON's, rounded: change the JSON and the table changes
    assert "FID_toy 40.7, adherence 0.957 (4 steps, 4 NFE" in table


def test_every_result_json_is_tabulated_or_listed_as_not_tabulated():
    untabulated = sorted(str(p.relative_to(REPO)) for p in (REPO / "eval" / "results").rglob("*.json")
                         if benchmarks_doc.kind_of(json.loads(p.read_text(encoding="utf-8"))) is None)
    assert untabulated == ["eval/results/toy-few-step/disback-path.json"]
    text = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    assert "## Files not tabulated" in text and "disback-path.json" in text.split("## Files not tabulated")[1]


def test_the_generator_refuses_a_methods_entry_that_names_no_entry(tmp_path):
    for name in ("eval", "docs", "training"):
        shutil.copytree(REPO / name, tmp_path / name)
    yaml_path = tmp_path / "docs" / "methods" / "methods.yaml"
    yaml_path.write_text(yaml_path.read_text(encoding="utf-8").replace("entry: toy-dmd}", "entry: nobody}", 1),
                         encoding="utf-8")
    with pytest.raises(benchmarks_doc.BenchmarksDocError, match="methods\\[0\\].*nobody"):
        benchmarks_doc.methods_table(tmp_path)


# ----------------------------------------------------------------------------------------------- experiments

def _public_names() -> dict[str, set[str]]:
    """``__all__`` of every stepdistill package, read from its ``__init__.py`` without importing it."""
    names = {}
    for init in (REPO / "stepdistill").rglob("__init__.py"):
        package = ".".join(init.parent.relative_to(REPO).parts)
        listed: set[str] = set()
        for node in ast.parse(init.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                listed = set(ast.literal_eval(node.value))
        names[package] = listed
    return names


def private_imports(source: str, public: dict[str, set[str]]) -> list[str]:
    """Imports of stepdistill names that no package lists in its ``__all__``."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "stepdistill":
            allowed = public.get(node.module, set())
            bad += [f"from {node.module} import {a.name}" for a in node.names if a.name not in allowed]
        elif isinstance(node, ast.Import):
            bad += [f"import {a.name}" for a in node.names if a.name.split(".")[0] == "stepdistill"]
    return bad


def test_private_import_check_catches_a_submodule_import():
    public = _public_names()
    assert "load_pipeline" in public["stepdistill.export"]
    assert private_imports("from stepdistill.export import load_pipeline\nimport torch\n", public) == []
    assert private_imports("from stepdistill.eval.generate import generate\nimport stepdistill.toy.world\n"
                           "from stepdistill.eval import _private\n", public) == [
        "from stepdistill.eval.generate import generate", "import stepdistill.toy.world",
        "from stepdistill.eval import _private"]


def test_every_study_has_a_readme_citing_its_scripts_and_uses_only_the_public_api():
    public = _public_names()
    studies = sorted(p for p in (REPO / "experiments").iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    assert len(studies) >= 8
    problems = []
    for study in studies:
        readme = study / "README.md"
        if not readme.is_file():
            problems.append(f"{study.name}: no README.md")
            continue
        text = readme.read_text(encoding="utf-8")
        scripts = sorted(study.glob("*.py"))
        if not scripts:
            problems.append(f"{study.name}: no script")
        for script in scripts:
            rel = script.relative_to(REPO).as_posix()
            if rel not in text:
                problems.append(f"{study.name}: README.md does not show the command running {rel}")
            problems += [f"{rel}: {bad}" for bad in private_imports(script.read_text(encoding="utf-8"), public)]
        if "Wrote:" not in text:
            problems.append(f"{study.name}: README.md does not say which result files it wrote (a 'Wrote:' line)")
        problems += [f"{study.name}: result file {p.name} belongs under eval/results/"
                     for p in study.iterdir() if fnmatch.fnmatch(p.name, "*.json")]
    assert problems == [], "\n".join(problems)


def test_no_public_name_hides_a_submodule_of_the_same_name():
    """``from stepdistill.eval import generate as _gen`` and ``import stepdistill.eval.generate as g`` must keep
    meaning the submodule: an ``__all__`` name equal to a submodule's name must be that submodule."""
    import importlib
    from types import ModuleType

    hidden = []
    for package, names in _public_names().items():
        folder = REPO.joinpath(*package.split("."))
        module = importlib.import_module(package)
        hidden += [f"{package}.{name}" for name in names
                   if (folder / f"{name}.py").is_file() and not isinstance(getattr(module, name), ModuleType)]
        hidden += [f"{package}.{p.stem}" for p in folder.glob("*.py")
                   if p.stem != "__init__" and p.stem in vars(module) and not isinstance(vars(module)[p.stem], ModuleType)]
    assert hidden == []
