"""The docs cannot rot: every ``visionzoo ...`` command in README.md and docs/*.md is parsed by
the CLI's own argument parser, its recipe must exist and every ``key=value`` override (and every
flag that is an alias of a config key) must resolve against the recipe's schema — without
training, loading data or needing the files the command names. Relative links must point at
files that exist. The examples in ``visionzoo --help`` and in the recipe YAMLs' headers are
checked the same way.

A command is found in fenced code blocks (also after ``python -m``, ``torchrun ... -m``,
``srun``, ``$ `` prompts, ``VAR=value`` prefixes; ``\\`` continuations joined, ``#`` comments
and ``;``/``&&``/``|`` separators honoured) and in inline code spans that start with
``visionzoo `` unless they only name a sub-command or are a synopsis (``[--flag]``, ``...``,
``RECIPE``). A block fenced as ``text`` is program output, not commands. Placeholder paths
(``runs/<run>``, ``RUN_DIR``, ``MODEL.onnx``) are fine: nothing is opened. A recipe or a config key
is never a placeholder: it must exist."""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import shlex
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

from visionzoo import cli
from visionzoo.config import RECIPES_PACKAGE, load_config, recipe_names, resolve
from visionzoo.data.sources.table import data_source
from visionzoo.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
# Pages that other issues of the same round add; a link to one of them is skipped (and named)
# while the page does not exist yet, any other broken link fails.
PAGES_OF_OTHERS = {f"docs/{n}.md" for n in (
    "troubleshooting", "faults", "devices", "report", "python-api", "trackers", "cpu", "architecture")}
SEPARATORS = {";", "&&", "||", "|", "&"}
FENCE = re.compile(r"^\s*(```|~~~)\s*(\w*)")
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)[^)]*\)")
# An inline span that is a synopsis, not a command: optional parts, an ellipsis, or a placeholder
# for a whole argument (`visionzoo bench RECIPE`, `train.seed=S`, `visionzoo train <recipe>`).
SYNOPSIS = re.compile(r"\s\[|\.\.\.|(^|[\s=])([A-Z][A-Z0-9_]*|<[^>\s]+>)(\s|$)")
# An inline span that only names a sub-command (`visionzoo train`, `visionzoo data pack`).
NAME_ONLY = re.compile(r"^(python -m )?visionzoo( [a-z]+){1,2}$")


def doc_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class DocCommand:
    """One visionzoo command line found in a page: where, as written, and its argument list."""

    where: str
    text: str
    argv: list[str]


def _tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split, lexer.commenters = True, "#"
    return list(lexer)


def _visionzoo_argv(tokens: list[str]) -> list[str] | None:
    """The arguments after ``visionzoo`` when this simple command runs visionzoo: as the program
    (after ``VAR=value`` assignments) or as a module (``python -m visionzoo``, ``torchrun ... -m``)."""
    for i, tok in enumerate(tokens):
        if tok != "visionzoo" and not tok.endswith("/bin/visionzoo"):
            continue
        if (i > 0 and tokens[i - 1] == "-m") or all(re.match(r"^[A-Za-z_]\w*=", t) for t in tokens[:i]):
            return tokens[i + 1:]
    return None


def commands_in_line(line: str, where: str) -> list[DocCommand]:
    """The visionzoo commands of one shell line (a ``$ `` prompt is dropped)."""
    line = re.sub(r"^\s*\$\s+", "", line)
    try:
        tokens = _tokens(line)
    except ValueError as err:  # an unbalanced quote: not a shell line
        return [DocCommand(where, line, ["<unparsable>", str(err)])] if "visionzoo" in line else []
    out, part = [], []
    for tok in tokens + [";"]:
        if tok not in SEPARATORS:
            part.append(tok)
            continue
        argv = _visionzoo_argv(part)
        if argv is not None:
            out.append(DocCommand(where, " ".join(part), argv))
        part = []
    return out


def commands_in(text: str, name: str) -> list[DocCommand]:
    """Every visionzoo command of a markdown page: code-block lines and inline code spans."""
    out, in_block, output, pending, start = [], False, False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            in_block, pending = not in_block, ""
            output = in_block and fence.group(2) == "text"  # what a program prints
            continue
        if in_block and output:
            continue
        if in_block:
            if not pending:
                start = n
            if line.rstrip().endswith("\\"):  # a continuation: join with the next line
                pending += line.rstrip()[:-1] + " "
                continue
            out += commands_in_line(pending + line, f"{name}:{start}")
            pending = ""
            continue
        for span in INLINE.findall(line):
            span = span.strip()
            if re.match(r"^(python -m )?visionzoo ", span) and not SYNOPSIS.search(span) and not NAME_ONLY.match(span):
                out += commands_in_line(span, f"{name}:{n}")
    return out


def all_doc_commands() -> list[DocCommand]:
    return [c for f in doc_files() for c in commands_in(f.read_text(), str(f.relative_to(ROOT)))]


def help_commands() -> list[DocCommand]:
    """The examples of ``visionzoo --help`` and of every sub-command's ``--help``."""
    out, todo = [], [("visionzoo", cli.build_parser())]
    while todo:
        name, parser = todo.pop()
        out += commands_in(f"```\n{parser.epilog or ''}\n```", f"{name} --help")
        todo += [(f"{name} {n}", sp) for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                 for n, sp in a.choices.items()]
    return out


def recipe_header_commands() -> list[DocCommand]:
    """The launch commands in each recipe YAML's header comment (``# Launch: visionzoo ...``)."""
    out = []
    for name in recipe_names():
        text = resources.files(RECIPES_PACKAGE).joinpath(f"{name}.yaml").read_text()
        for n, line in enumerate(text.splitlines(), 1):
            if not line.startswith("#"):
                break  # the header ends at the first key
            cmd = re.sub(r"^#\s*(\w+:)?\s*", "", line)
            if re.match(r"^(visionzoo|torchrun|python -m visionzoo) ", cmd):
                out += commands_in_line(cmd, f"recipes/{name}.yaml:{n}")
    return out


class DocCommandError(Exception):
    """A documented command that the CLI would refuse."""


def _strict_parser() -> argparse.ArgumentParser:
    """The CLI's parser with abbreviated flags refused: the docs spell every flag in full, so a
    renamed flag cannot hide behind a prefix of its new name."""
    parser = cli.build_parser()
    todo = [parser]
    while todo:
        p = todo.pop()
        p.allow_abbrev = False
        todo += [sp for a in p._actions if isinstance(a, argparse._SubParsersAction) for sp in a.choices.values()]
    return parser


def _resolve(recipe: str | None, overrides: list[str]) -> None:
    """Resolve the overrides against the recipe (name or YAML file); without a recipe (a run
    folder, a YAML file that is a placeholder) against the schema's defaults."""
    error = _resolve_once(recipe, tuple(overrides))
    if error:
        raise UserError(error)


@functools.cache
def _resolve_once(recipe: str | None, overrides: tuple[str, ...]) -> str:
    """The error of one resolution, or ''; cached: many documented commands repeat (OmegaConf is slow)."""
    try:
        if recipe and not (recipe.endswith((".yaml", ".yml")) and not Path(recipe).is_file()):
            cfg = load_config(recipe, list(overrides))
        else:
            cfg = resolve({}, "docs", list(overrides))
        data_source(cfg.data.name)  # as the CLI checks it (cli._config)
    except UserError as e:
        return str(e)
    return ""


def check_command(argv: list[str]) -> None:
    """Parse ``visionzoo ARGV`` as the CLI does and resolve its recipe and config overrides, as
    the sub-command's ``cmd_*`` function in cli.py builds them; raises DocCommandError."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = cli.parse_args(argv, _strict_parser())
    except SystemExit:
        raise DocCommandError(err.getvalue().strip().splitlines()[-1]) from None
    try:
        if args.command in ("train", "bench"):
            extra = [f"train.perf_steps={args.steps}"] if args.steps is not None else []
            if args.command == "train" and args.output:
                extra.append(f"output={args.output}")
            if args.command == "bench" and args.compile:
                extra.append("train.compile=true")
            _resolve(args.recipe, cli._overrides(args) + extra)
        elif args.command == "recipes" and args.show:
            _resolve(args.show, cli._overrides(args))
        elif args.command in ("eval", "knn", "linear", "export"):
            extra = []
            if args.command == "linear" and args.epochs:  # the probe's epochs (cmd_linear)
                extra, args.epochs = [f"dino.linear_epochs={args.epochs}"], None
            if args.command == "export":  # no config flags (cmd_export)
                args.overrides, args.data = [], None
            _checkpoint, overrides, kw = cli._weights_args(args)
            _resolve(kw["recipe"], overrides + extra)
    except UserError as e:
        raise DocCommandError(str(e)) from None


def _refused(commands: list[DocCommand]) -> list[str]:
    bad = []
    for c in commands:
        try:
            if c.argv[:1] == ["<unparsable>"]:
                raise DocCommandError(f"not a shell line: {c.argv[1]}")
            check_command(c.argv)
        except DocCommandError as e:
            bad.append(f"{c.where}: {c.text}\n    -> {e}")
    return bad


def test_every_documented_command_parses_and_resolves():
    commands = all_doc_commands()
    assert len(commands) > 50, "the command collector found too few commands"
    bad = _refused(commands)
    assert not bad, f"{len(bad)} documented command(s) the CLI refuses:\n" + "\n".join(bad)


def test_help_examples_and_recipe_headers_parse_and_resolve():
    commands = help_commands() + recipe_header_commands()
    assert len(commands) > 40, "the command collector found too few commands"
    bad = _refused(commands)
    assert not bad, f"{len(bad)} example command(s) the CLI refuses:\n" + "\n".join(bad)


def test_a_wrong_flag_recipe_or_key_fails_the_check():
    """The checker is not a rubber stamp: a renamed flag, an abbreviation, an unknown recipe, a
    renamed config key and a wrong value type each fail; the correct line passes."""
    check_command(["train", "fashion_mnist", "--epochs", "3", "optim.lr=0.2"])
    wrong = {
        "flag": ["train", "fashion_mnist", "--num-epochs", "3"],
        "abbreviated flag": ["train", "fashion_mnist", "--epoch", "3"],
        "recipe": ["train", "fashion_mnst", "--epochs", "3"],
        "key": ["train", "fashion_mnist", "optim.learning_rate=0.2"],
        "data source": ["train", "fashion_mnist", "data.name=fashon_mnist"],
        "key after a flag": ["train", "fashion_mnist", "--data", "synthetic", "train.epoch=2"],
        "type": ["train", "fashion_mnist", "train.epochs=many"],
        "alias value": ["train", "fashion_mnist", "--amp", "fp8"],
        "key of a run folder": ["knn", "runs/<run>", "dino.knn=[20]"],
        "export override": ["export", "runs/<run>", "optim.lr=0.2"],
        "sub-command": ["evaluate", "runs/<run>"],
    }
    for what, argv in wrong.items():
        with pytest.raises(DocCommandError):
            check_command(argv)
            pytest.fail(f"a wrong {what} passed the check: {argv}")


def test_renaming_a_flag_in_the_cli_fails_every_page_that_uses_it(monkeypatch):
    """What CI would see after `--epochs` became `--num-epochs` in cli.py: each documented
    command that still says --epochs is refused."""
    original = cli._add_config_flags

    def renamed(p: argparse.ArgumentParser, **kwargs) -> None:
        original(p, **kwargs)
        if "--epochs" not in p._option_string_actions:  # eval/knn/linear take no training flags
            return
        action = p._option_string_actions.pop("--epochs")
        action.option_strings = ["--num-epochs"]
        p._option_string_actions["--num-epochs"] = action

    monkeypatch.setattr(cli, "_add_config_flags", renamed)
    # (linear has an --epochs of its own: the probe's epochs, not a config flag)
    documented = [c for c in all_doc_commands() if "--epochs" in c.argv and c.argv[0] != "linear"]
    assert documented, "no documented command uses --epochs any more: pick another flag"
    assert len(_refused(documented)) == len(documented)
    check_command(["train", "fashion_mnist", "--num-epochs", "3"])


def test_collector_reads_shell_lines_as_a_user_types_them():
    page = "\n".join([
        "Run `visionzoo train fashion_mnist --epochs 1` or `visionzoo recipes --show NAME [key=value ...]`.",
        "`visionzoo train` and `visionzoo data pack` are names; `visionzoo bench RECIPE`, `visionzoo train <recipe>`,",
        "`visionzoo train fashion_mnist train.seed=S` synopses.",
        "```bash",
        "visionzoo train densenet201_imagenet --data /data/imagenet   # a comment --not-a-flag",
        "torchrun --nnodes 2 --nproc-per-node 8 \\",
        "    -m visionzoo train alexnet_imagenet optim.lr=0.2   # on each machine",
        "$ visionzoo eval /tmp/fm1",
        "/tmp/fm1/model.onnx: onnx export of visionzoo small_cnn",
        "visionzoo knn runs/<run> ; visionzoo linear runs/<run> && echo done",
        "OMP_NUM_THREADS=1 python -m visionzoo train fashion_mnist data.train='/x/train-{0..9}.tar'",
        "```",
    ])
    found = [(c.where, c.argv) for c in commands_in(page, "p.md")]
    assert found == [
        ("p.md:1", ["train", "fashion_mnist", "--epochs", "1"]),
        ("p.md:5", ["train", "densenet201_imagenet", "--data", "/data/imagenet"]),
        ("p.md:6", ["train", "alexnet_imagenet", "optim.lr=0.2"]),
        ("p.md:8", ["eval", "/tmp/fm1"]),
        ("p.md:10", ["knn", "runs/<run>"]),
        ("p.md:10", ["linear", "runs/<run>"]),
        ("p.md:11", ["train", "fashion_mnist", "data.train=/x/train-{0..9}.tar"]),
    ]


def relative_links(files: list[Path], root: Path = ROOT) -> tuple[list[str], list[str]]:
    """Relative links (outside code blocks) whose file is missing: (broken, to a page of another
    issue). URLs and same-page anchors are not checked; ``page.md#anchor`` checks page.md."""
    broken, pending = [], []
    for f in files:
        text = re.sub(r"^\s*(```|~~~).*?^\s*(```|~~~)", "", f.read_text(), flags=re.DOTALL | re.MULTILINE)
        for target in LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            path = (f.parent / target.split("#")[0]).resolve()
            if path.exists():
                continue
            rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
            (pending if rel in PAGES_OF_OTHERS else broken).append(f"{f.relative_to(root)} -> {target}")
    return broken, pending


def test_relative_links_point_at_files():
    broken, pending = relative_links(doc_files())
    if pending:
        msg = "links to pages other issues add, not there yet: " + ", ".join(pending)
        print(msg)
        warnings.warn(msg, stacklevel=1)  # about the docs, not about a caller
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_a_broken_link_fails_and_a_page_of_another_issue_is_only_named(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "data.md").write_text("# data\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/data.md#shards) [url](https://x.org/a.md) [anchor](#tests)\n"
                    "[gone](docs/dta.md) [later](docs/faults.md)\n```\n[in code](nowhere.md)\n```\n")
    assert relative_links([page], tmp_path) == (["README.md -> docs/dta.md"], ["README.md -> docs/faults.md"])


def test_a_text_block_is_output_not_commands() -> None:
    page = "```text\nvisionzoo: training x | visionzoo small_cnn | 1 × cpu\n```\n```bash\nvisionzoo recipes\n```\n"
    assert [c.argv for c in commands_in(page, "page.md")] == [["recipes"]]


YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.DOTALL | re.MULTILINE)


def doc_recipes(tmp_path: Path) -> dict[str, Path]:
    """Every ```yaml block of README.md and docs/ (they are recipe files) written to
    ``tmp_path/<recipe>.yaml``, by the name its ``recipe:`` key gives."""
    out = {}
    for f in doc_files():
        for n, block in enumerate(YAML_BLOCK.findall(f.read_text())):
            name = re.search(r"^recipe:\s*(\S+)", block, re.MULTILINE)
            path = tmp_path / f"{name.group(1) if name else f'{f.stem}-{n}'}.yaml"
            path.write_text(block)
            out[path.stem] = path
    return out


def test_recipe_files_in_the_docs_resolve_with_the_recipe_schema(tmp_path):
    """The recipe files docs/your-data.md shows are whole recipes the real schema accepts: from
    scratch, fine-tuned from timm's weights (model.pretrained) and from a file (model.weights);
    the page's commands that name them resolve against them, overrides included."""
    recipes = doc_recipes(tmp_path)
    configs = {name: load_config(str(path)) for name, path in recipes.items()}  # a UserError fails the test
    mine = {n: c for n, c in configs.items() if n.startswith("my_flowers")}
    assert set(mine) == {"my_flowers", "my_flowers_finetune", "my_flowers_tv"}
    assert all(c.data.name == "imagefolder" for c in mine.values())
    assert not mine["my_flowers"].model.pretrained and not mine["my_flowers"].model.weights
    assert (mine["my_flowers_finetune"].model.library, mine["my_flowers_finetune"].model.pretrained) == ("timm", True)
    assert mine["my_flowers_tv"].model.library == "torchvision" and mine["my_flowers_tv"].model.weights
    page = ROOT / "docs" / "your-data.md"
    named = [c for c in commands_in(page.read_text(), "docs/your-data.md")
             if any(a.endswith(".yaml") for a in c.argv)]
    assert len(named) >= 4
    for c in named:
        args = cli.parse_args(c.argv, _strict_parser())
        recipe = args.show if args.command == "recipes" else args.recipe
        load_config(str(recipes[Path(recipe).stem]), cli._overrides(args))


def test_the_dino_demo_model_is_named_as_the_recipe_builds_it():
    """README's recipes table and docs/dino.md name dino_fashion_mnist's network by what the
    recipe builds (timm's name resized by model.kwargs), as `visionzoo recipes` prints it."""
    m = load_config("dino_fashion_mnist").model
    k = m.kwargs
    words = [m.name, f"{k['depth']}-block ViT", f"{k['patch_size']} px patches", f"embed {k['embed_dim']}",
             f"{k['num_heads']} heads", f"{k['img_size']} px", "mean patch token"]
    for page in (ROOT / "README.md", ROOT / "docs" / "dino.md"):
        text = page.read_text()
        assert [w for w in words if w not in text] == [], page.name
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli.main(["recipes"])
    row = next(line for line in out.getvalue().splitlines() if line.startswith("| dino_fashion_mnist |"))
    assert f"timm {m.name} with img_size {k['img_size']}, patch_size {k['patch_size']}, embed_dim " \
           f"{k['embed_dim']}, depth {k['depth']}, num_heads {k['num_heads']}, global_pool {k['global_pool']} |" in row
