"""The documentation against what it documents: README's results table against the JSON it names,
every generated table and docs/cli.md against their generators, every flag the docs name against the
script that takes it, every relative link. Reads text and JSON only: no model, no SAE."""
import contextlib
import io
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import cli_doc  # noqa: E402
import doc_tables  # noqa: E402

DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
REGENERATE = "regenerate with `python tools/doc_tables.py` after checking the change is intended"


def read(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# README's results table
# ------------------------------------------------------------------------------------------------

def readme_table() -> tuple[list[str], list[list[str]]]:
    """Header cells and rows of the table between `<!-- table readme -->` and `<!-- end table -->`."""
    text = read(ROOT / "README.md")
    block = text.split("<!-- table readme -->\n", 1)[1].split("<!-- end table -->", 1)[0]
    lines = [l for l in block.splitlines() if l.startswith("|")]
    cells = [[c.strip() for c in l.strip().strip("|").split("|")] for l in lines]
    return cells[0], cells[2:]


def printed(cell: str) -> tuple[str, str | None]:
    """'0.386 ± 0.031' -> ('0.386', '0.031'); '0.000' -> ('0.000', None)."""
    mean, _, err = cell.partition(" ± ")
    return mean, err or None


def check_cell(cell: str, value) -> str | None:
    """None when `cell` is `value` (mean, stderr) rounded as printed; else what is wrong."""
    if value is None:
        return None if cell == "–" else "the JSON has no such entry"
    mean, err = value
    if mean is None:
        return None if cell == "n.r." else "the JSON value is null (print n.r.)"
    m, e = printed(cell)
    decimals = len(m.partition(".")[2])
    if f"{mean:.{decimals}f}" != m:
        return f"mean {mean!r}"
    if e is None:
        return None if not err else f"stderr {err!r} is not printed"
    return None if err and f"{err:.{decimals}f}" == e else f"stderr {err!r}"


def test_readme_results_table_names_its_sources_and_matches_them():
    header, rows = readme_table()
    keys = [re.fullmatch(r".*`(\w+)\.([\w.]+)`", h) for h in header[2:]]
    assert header[:2] == ["run", "strategy"] and keys and all(keys), \
        f"every value column names its key as `entry.key`: {header}"
    assert len(rows) >= 3
    wrong = []
    for row in rows:
        run_link = re.fullmatch(r"\[([^\]]+)\]\(([^)]+)\)", row[0])
        strategy = re.fullmatch(r"`(\w+)`", row[1])
        assert run_link and strategy, f"a row names its run's final_info.json and its strategy: {row[:2]}"
        path = ROOT / run_link.group(2)
        assert path.name == "final_info.json" and path.is_file(), f"{run_link.group(2)} is not a results file"
        info = json.loads(path.read_text())
        for cell, key in zip(row[2:], keys):
            entry = info.get(f"{key.group(1)}_{strategy.group(1)}")
            value = None if entry is None else (entry["means"][key.group(2)], entry["stderrs"][key.group(2)])
            problem = check_cell(cell, value)
            if problem:
                wrong.append(f"{run_link.group(2)} {key.group(1)}_{strategy.group(1)}.{key.group(2)}: "
                             f"printed {cell!r}, {problem}")
    assert not wrong, "README's results table differs from the JSON:\n" + "\n".join(wrong) + f"\n{REGENERATE}"


def test_check_cell_reads_numbers_as_printed():
    assert check_cell("0.386 ± 0.031", (0.38649, 0.0306)) is None
    assert check_cell("0.386 ± 0.031", (0.3871, 0.0306)) == "mean 0.3871"
    assert check_cell("0.000", (0.0, 0.0)) is None
    assert check_cell("0.000", (0.0, 0.002)) == "stderr 0.002 is not printed"
    assert check_cell("n.r.", (None, None)) is None
    assert check_cell("0.5", (None, None)) is not None
    assert check_cell("–", None) is None


def test_every_generated_table_matches_the_json():
    diffs = doc_tables.stale()
    assert not diffs, "\n".join(diffs.values()) + f"\n{REGENERATE}"


# ------------------------------------------------------------------------------------------------
# Flags and docs/cli.md
# ------------------------------------------------------------------------------------------------

FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
SCRIPT = re.compile(r"(?:tools/\w+|\bbench|\bplot|\bexperiment)\.py")
PIP_FLAGS = {"--no-deps"}  # pip's own, on the set-up and test lines


def calibration_flags() -> set[str]:
    """The flags tools/selection_scan.py's calibration_args adds, read from its source."""
    text = (ROOT / "tools" / "selection_scan.py").read_text()
    body = text[text.index("def calibration_args"):]
    body = body[:body.index("\n\n\n")]
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", body))


def script_flags() -> dict[str, set[str]]:
    """Flags each script takes: experiment.py's from its own parser, the others' from their
    add_argument calls."""
    out = {"experiment.py": {o for a in cli_doc.experiment_parser()._actions for o in a.option_strings}}
    for path in [ROOT / "bench.py", ROOT / "plot.py"] + sorted((ROOT / "tools").glob("*.py")):
        text = path.read_text()
        found = re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", text)
        # a tool that hands the flags it does not know to experiment.parse_config takes those too
        through = out["experiment.py"] if "parse_known_args" in text and "ex.parse_config(rest" in text else set()
        # a calibration-document tool takes tools/selection_scan.py's shared flags (calibration_args)
        shared = calibration_flags() if "ss.calibration_args(" in text else set()
        out[path.relative_to(ROOT).as_posix()] = set(found) | {"--help", "-h"} | through | shared
    return out


def commands(text: str):
    """(script, the text its flags are in) for every `python SCRIPT ...` or `torchrun ... SCRIPT ...`
    command: each line of a code block from the script on (comment included), and each inline code
    span from the script on."""
    in_code = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            for part in line.split("&&"):
                m = re.search(r"(?:python|torchrun(?:\s+--\S+)*)\s+(?:-u\s+)?(\S+\.py)", part)
                if m:
                    yield m.group(1), part[m.end():]
                elif part.strip().startswith("pip "):
                    yield "pip", part
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        m = re.search(r"python\s+(?:-u\s+)?(\S+\.py)", span)
        if m:
            yield m.group(1), span[m.end():]


def test_every_flag_the_docs_name_exists():
    """A flag on a command line (a code-block line or an inline code span running `python SCRIPT`)
    must be one SCRIPT takes; on a `pip` line, pip's. Every other `--flag` on a page must be one of
    experiment.py's or of a script that page names (e.g. `--versus` beside tools/budget_curve.py)."""
    flags = script_flags()
    wrong = []
    for doc in DOCS:
        text = read(doc)
        for script, args in commands(text):
            allowed = PIP_FLAGS if script == "pip" else flags.get(script)
            if allowed is None:
                wrong.append(f"{doc.name}: `python {script}`: no such script")
                continue
            for f in FLAG.findall(args):
                if f not in allowed:
                    wrong.append(f"{doc.name}: {script} has no flag {f}")
        named = set(SCRIPT.findall(text)) & set(flags)
        page = PIP_FLAGS | flags["experiment.py"] | set().union(*(flags[s] for s in named))
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        wrong += [f"{doc.name}: {f} is no flag of experiment.py or of a script this page names"
                  for f in sorted(set(FLAG.findall(prose)) - page)]
    assert not wrong, "\n".join(wrong)


def test_flag_check_catches_a_wrong_flag():
    flags = script_flags()
    cmds = list(commands("```bash\npython tools/budget_curve.py run_1 --versus pattern,dsg  # --nope\n```\n"
                         "Run `python experiment.py --out_dir=x --windw=4`."))
    assert cmds[0][0] == "tools/budget_curve.py" and set(FLAG.findall(cmds[0][1])) == {"--versus", "--nope"}
    assert "--windw" in FLAG.findall(cmds[1][1]) and "--windw" not in flags["experiment.py"]
    assert "--versus" in flags["tools/budget_curve.py"] and "--window" in flags["experiment.py"]


def test_cli_md_is_generated_from_config_and_matches_help():
    text = read(ROOT / "docs" / "cli.md")
    assert text == cli_doc.generate(), "docs/cli.md is out of date: run `python tools/cli_doc.py`"
    import experiment as ex
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        ex.parse_config(["--help"])
    helped = set(FLAG.findall(out.getvalue())) - {"--help"}
    documented = set(FLAG.findall("\n".join(l.split("|")[1] for l in text.splitlines() if l.startswith("| `"))))
    assert helped == documented
    assert {f"--{f.name}" for f in ex.dataclasses.fields(ex.Config)} <= documented
    for action in cli_doc.experiment_parser()._actions:
        if action.dest != "help":
            assert cli_doc.md(cli_doc.help_of(action)) in text, action.dest


# ------------------------------------------------------------------------------------------------
# Links
# ------------------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchors(doc: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces to -."""
    seen, out = {}, set()
    for line in re.sub(r"```.*?```", "", read(doc), flags=re.S).splitlines():
        m = re.match(r"#+ (.+)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_relative_link_resolves():
    wrong = []
    for doc in DOCS:
        for target in LINK.findall(read(doc)):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                wrong.append(f"{doc.name}: {target}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                wrong.append(f"{doc.name}: {target}: no heading #{anchor} in {file.name}")
    assert not wrong, "\n".join(wrong)


@pytest.fixture
def docs_root(tmp_path, monkeypatch):
    """doc_tables reading run folders under tmp_path, its caches empty before and after."""
    monkeypatch.setattr(doc_tables, "ROOT", tmp_path)
    doc_tables.final_info.cache_clear()
    doc_tables.seed_infos.cache_clear()
    yield tmp_path
    doc_tables.final_info.cache_clear()
    doc_tables.seed_infos.cache_clear()


def test_verdict_compares_means_with_stderr_and_counts_seed_wins(docs_root):
    """doc_tables.compare: beyond two combined stderrs it names the side, within them it counts the
    seeds where the run beats the reference, paired by seed number; lower-is-better flips the side."""
    def run(name, mean, se, per_seed):
        (docs_root / name).mkdir()
        (docs_root / name / "final_info.json").write_text(json.dumps({"m": {"means": {"x": mean}, "stderrs": {"x": se}}}))
        for k, v in enumerate(per_seed):
            (docs_root / name / f"seed_{k}").mkdir()
            (docs_root / name / f"seed_{k}" / "final_info.json").write_text(json.dumps({"m": {"means": {"x": v}}}))
    run("ref", 0.50, 0.01, [0.49, 0.50, 0.51])
    run("far", 0.60, 0.01, [0.59, 0.60, 0.61])
    run("near", 0.51, 0.02, [0.53, 0.48, 0.52])
    assert doc_tables.compare("far", "ref", "m", "x", 1, 2) == "+0.10 ± 0.01: **better**"
    assert doc_tables.compare("far", "ref", "m", "x", -1, 2) == "+0.10 ± 0.01: **worse**"
    assert doc_tables.compare("near", "ref", "m", "x", 1, 2) == "+0.01 ± 0.02: within 2 se, better on 2/3 seeds"
    assert doc_tables.compare("near", "ref", "m", "x", -1, 2) == "+0.01 ± 0.02: within 2 se, better on 1/3 seeds"


def test_evidence_table_pairs_runs_and_takes_the_difference(docs_root):
    """doc_tables.t_evidence: per pair (ema run, hmm run) both values and hmm - ema, judged in the measure's
    own direction (fewer retain rows touched is better), a measure without one (the threshold's
    calibration rate) as a bare difference; a measure one run lacks is `–`, one no run has is left out, an
    odd number of runs an error."""
    def run(name, rows, cal, per_seed_rows):
        (docs_root / name).mkdir()
        means = {"fire_rows_retain": rows, "cal_fire_rate_retain": cal}
        info = {"detection_learned": {"means": means, "stderrs": {"fire_rows_retain": 0.01, "cal_fire_rate_retain": 0.0}}}
        if name == "hmm":  # a measure only the second run has
            info["frontier_pattern"] = {"means": {"precision_auroc_at_ce_0.5": 0.8}, "stderrs": {"precision_auroc_at_ce_0.5": 0.01}}
        (docs_root / name / "final_info.json").write_text(json.dumps(info))
        for k, v in enumerate(per_seed_rows):
            (docs_root / name / f"seed_{k}").mkdir()
            seed = {"detection_learned": {"means": {"fire_rows_retain": v, "cal_fire_rate_retain": cal}}}
            (docs_root / name / f"seed_{k}" / "final_info.json").write_text(json.dumps(seed))
    run("ema", 0.30, 0.01, [0.29, 0.30, 0.31])
    run("hmm", 0.15, 0.01, [0.14, 0.15, 0.16])
    lines = doc_tables.t_evidence("README.md", "ema", "hmm")
    rows = {l.split(" | ")[0].lstrip("| "): l for l in lines[2:]}
    assert rows["detector retain rows with a fire"].endswith("| 0.300 ± 0.010 | 0.150 ± 0.010 | -0.150 ± 0.014: **better** |")
    assert rows["calibration retain fire rate per token"].endswith("| 0.0100 | 0.0100 | +0.0000 ± 0.0000 |")
    assert rows["`pattern` precision AUROC at +0.5"].endswith("| – | 0.800 ± 0.010 | – |")
    assert "detection token AUROC" not in rows and "`dsg` forget CE within retain KL 0.01" not in rows
    assert lines[0].endswith("| hmm − ema |")
    assert doc_tables.KINDS["threshold"]("README.md", "ema", "hmm")[0].endswith("| row − token |")
    with pytest.raises(ValueError, match="pairs"):
        doc_tables.t_evidence("README.md", "ema")


def test_budgets_table_reads_each_seeds_sweep(docs_root):
    """doc_tables.t_budgets: per run and gated strategy, the forget-CE increase within each retain-KL
    budget along the seed's own front (sweep.json; the clean model at the origin), mean ± stderr over
    seeds; a strategy a run did not sweep has no row."""
    def pt(s, ce, kl):
        return {"strategy": s, "forget_ce_increase": ce, "retain_kl": kl, "forget_ce_increase_stderr": 0.0,
                "retain_kl_stderr": 0.0}
    (docs_root / "r").mkdir()
    (docs_root / "r" / "final_info.json").write_text("{}")
    for k, top in enumerate((1.0, 3.0)):  # pattern reaches `top` at retain KL 0.01: a line from the origin
        (docs_root / "r" / f"seed_{k}").mkdir()
        pts = [pt("standard", 5.0, 1.0), pt("pattern", top, 0.01)]
        (docs_root / "r" / f"seed_{k}" / "sweep.json").write_text(json.dumps({"points": pts}))
    lines = doc_tables.t_budgets("README.md", "r")
    assert lines[0] == "| strategy, run | KL 0.001 | KL 0.005 | KL 0.01 | KL 0.05 |"
    assert len(lines) == 3 and lines[2].startswith("| `pattern`, [r](")
    # seeds reach 0.1 / 0.3 within 0.001, 0.5 / 1.5 within 0.005, 1 / 3 within 0.01 and 0.05
    assert lines[2].endswith("| 0.20 ± 0.10 | 1.00 ± 0.50 | 2.00 ± 1.00 | 2.00 ± 1.00 |")


def test_control_table_sets_each_strategy_against_its_random_latents(docs_root):
    """doc_tables.t_control: per strategy with a --random_control entry, the selections' value, the random
    twins' and their difference judged in the measure's direction (lower retain KL is better); strategies
    without a control have no rows, a run without one gives `–`."""
    def entry(ce, kl, se):
        means = {key: 0.5 for _, _, key, _, _ in doc_tables.CONTROL_MEASURES}
        means.update({"forget_ce_within_retain_kl_0.01": ce, "retain_kl_at_ce_0.5": kl})
        errs = dict.fromkeys(means, 0.0)
        errs.update({"forget_ce_within_retain_kl_0.01": se, "retain_kl_at_ce_0.5": 0.0001})
        return {"means": means, "stderrs": errs}
    (docs_root / "c").mkdir()
    info = {"frontier_pattern": entry(5.0, 0.0010, 0.1), "frontier_pattern_random": entry(4.0, 0.0020, 0.1),
            "frontier_standard": entry(0.1, 0.4, 0.0), "unlearning_pattern": entry(0, 0, 0),
            "unlearning_pattern_random": entry(0, 0, 0)}
    (docs_root / "c" / "final_info.json").write_text(json.dumps(info))
    (docs_root / "p").mkdir()
    (docs_root / "p" / "final_info.json").write_text(json.dumps({"frontier_pattern": entry(5.0, 0.001, 0.1)}))
    lines = doc_tables.t_control("README.md", "c", "p")
    rows = {l.split(" | ")[0].lstrip("| "): l for l in lines[2:]}
    assert set(rows) == {f"`pattern`: {t}" for t, *_ in doc_tables.CONTROL_MEASURES}
    assert rows["`pattern`: forget CE within retain KL 0.01"].endswith(
        "| 5.00 ± 0.10 | 4.00 ± 0.10 | +1.00 ± 0.14: **better** | – | – | – |")
    assert "| 0.0010 ± 0.0001 | 0.0020 ± 0.0001 | -0.0010 ± 0.0001: **better** |" in rows["`pattern`: retain KL at +0.5"]


def test_gate_table_sets_the_residual_gate_against_the_latent_gate(docs_root):
    """doc_tables.t_gate: pattern's rows read the same entry in both runs; the gate rows read each run's own
    gate (detection_learned in the first, detection_residual in the second), judged in the measure's
    direction (a later stop is worse)."""
    def entry(v, se=0.0):
        keys = {key for _, _, key, _, _, _ in doc_tables.GATE_MEASURES}
        return {"means": dict.fromkeys(keys, v), "stderrs": dict.fromkeys(keys, se)}
    infos = {"a": {"frontier_pattern": entry(5.0, 0.1), "unlearning_pattern": entry(0.5), "detection_pattern": entry(0.3),
                   "detection_learned": entry(2.0), "detection_residual": entry(9.0)},
             "b": {"frontier_pattern": entry(4.0, 0.1), "unlearning_pattern": entry(0.5), "detection_pattern": entry(0.3),
                   "detection_learned": entry(9.0), "detection_residual": entry(4.0)}}
    # a combined run carries both other detectors too; its gate is detection_combined. Both have a generation stage.
    infos["c"] = dict(infos["b"], detection_residual=entry(1.0), detection_combined=entry(3.0), generation_pattern=entry(0.8))
    infos["a2"] = dict(infos["a"], generation_pattern=entry(0.9))
    for run, info in infos.items():
        (docs_root / run).mkdir()
        (docs_root / run / "final_info.json").write_text(json.dumps(info))
    lines = doc_tables.t_gate("README.md", "a", "b")
    rows = {l.split(" | ")[0].lstrip("| "): l for l in lines[2:]}
    generation = {t for t, e, *_ in doc_tables.GATE_MEASURES if e == "generation_pattern"}
    assert generation and set(rows) == {t for t, *_ in doc_tables.GATE_MEASURES} - generation  # no stage: no rows
    assert len(doc_tables.t_gate("README.md", "a", "c")) == len(lines)  # one run without the stage: none either
    assert "raw residual" in lines[0] and "residual − latents" in lines[0]
    assert rows["`pattern` forget CE within retain KL 0.01"].endswith("| 5.00 ± 0.10 | 4.00 ± 0.10 | -1.00 ± 0.14: **worse** |")
    assert rows["gate: median tokens to stop after the passage"].endswith("| 2.0 | 4.0 | +2.0 ± 0.0: **worse** |")
    assert rows["gate: token AUROC"].endswith("| 2.000 | 4.000 | +2.000 ± 0.000: **better** |")
    lines = doc_tables.t_gate("README.md", "a2", "c")
    rows = {l.split(" | ")[0].lstrip("| "): l for l in lines[2:]}
    assert "latents + residual" in lines[0] and "combined − latents" in lines[0]
    assert rows["gate: token AUROC"].endswith("| 2.000 | 3.000 | +1.000 ± 0.000: **better** |")
    assert rows["`pattern` generation: retain continuations identical to clean"].endswith("| 0.90 | 0.80 | -0.10 ± 0.00: **worse** |")
    with pytest.raises(ValueError, match="pairs"):
        doc_tables.t_gate("README.md", "a")
