"""vlp as a user installs it: the wheel carries the presets and launch files; help shows examples.

The wheel test builds vlp's wheel from the checkout's files, installs it (without
dependencies) into a fresh virtualenv that borrows this environment's third-party
packages through a `.pth` line (a path line does not run the editable install's
hook, so the only `vlp` there is the wheel's), and runs the commands from a folder
outside the checkout.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

import pytest

from vlp.app.cli import build_parser
from vlp.core.shipped import resolve, shipped_dir

REPO = Path(__file__).resolve().parents[1]


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            yield from action.choices.items()


def _all_parsers(parser, prefix="vlp"):
    yield prefix, parser
    for name, sub in _subparsers(parser):
        yield from _all_parsers(sub, f"{prefix} {name}")


def test_every_help_ends_with_two_or_three_examples_that_parse():
    parsers = dict(_all_parsers(build_parser()))
    assert {"vlp", "vlp train", "vlp demo", "vlp eval compare", "vlp launch", "vlp shards synth",
            "vlp config show"} <= set(parsers)
    for name, parser in parsers.items():
        head, _, examples = parser.format_help().rpartition("examples:\n")
        lines = [line.strip() for line in examples.splitlines() if line.strip()]
        assert head and 2 <= len(lines) <= 3, f"`{name} --help` ends with {len(lines)} examples"
        for line in lines:
            for command in line.split("#")[0].split("&&"):  # each vlp command in the line parses
                words = shlex.split(command.split(">")[0])
                if words[0] == "vlp":
                    build_parser().parse_args(words[1:])
                else:
                    assert words[0] == "torchrun", line


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"vlp {version('vlp')}"


def test_shipped_names_resolve_and_local_copies_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("configs/demo.yaml") == str(shipped_dir("configs") / "demo.yaml")
    assert resolve("demo") == resolve("demo.yaml") == resolve("configs/demo.yaml")
    assert resolve("launch/ds_zero2_offload.json") == str(shipped_dir("launch") / "ds_zero2_offload.json")
    assert resolve("launch/nope.json") == "launch/nope.json"  # left for the caller's "not found"
    assert resolve("configs/../pyproject.toml") == "configs/../pyproject.toml"  # names only, never paths
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("demo: {pairs: 10}\n")
    assert resolve("configs/demo.yaml") == "configs/demo.yaml"


def test_launch_init_writes_copies_once_and_they_are_used(tmp_path, monkeypatch, capsys):
    from vlp.app.cli import main

    assert main(["launch", "init", str(tmp_path / "site")]) == 0
    ours = sorted(p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("*") if p.is_file())
    assert "launch/slurm.sbatch" in ours and "configs/vit-b-16-gpu.yaml" in ours and len(ours) == 15
    for rel in ours:
        folder, name = rel.split("/")
        assert (tmp_path / "site" / rel).read_bytes() == (shipped_dir(folder) / name).read_bytes()
    assert (tmp_path / "site" / "launch" / "slurm.sbatch").stat().st_mode & 0o111  # still executable
    capsys.readouterr()
    assert main(["launch", "init", str(tmp_path / "site")]) == 2  # never overwrites an edited copy
    assert "never overwrites" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path / "site")
    assert main(["launch", "--config", "configs/vit-b-16-gpu.yaml", "--dry-run"]) == 0
    assert " launch/slurm.sbatch --config configs/vit-b-16-gpu.yaml" in capsys.readouterr().out


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_outside_the_checkout(tmp_path):
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for rel in tracked:  # the files a release is built from: no run folders, venvs or egg-info
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, capture_output=True)
    (wheel,) = wheels.glob("vlp-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, open_clip, ...
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True)

    away = tmp_path / "elsewhere"
    away.mkdir()
    vlp = venv / "bin" / "vlp"

    def run(*args: str) -> str:
        done = subprocess.run([str(vlp), *args], cwd=away, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    where = subprocess.run([str(py), "-c", "import vlp.launch, vlp.configs; print(vlp.launch.__file__)"], cwd=away,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site), where  # the wheel's vlp, not the checkout's
    assert "examples:" in run("demo", "--help")
    assert run("--version").strip() == f"vlp {version('vlp')}"
    printed = run("launch", "--config", "configs/vit-b-16-gpu.yaml", "launch.launcher=slurm", "--dry-run")
    sbatch = next(line for line in printed.splitlines() if line.startswith("sbatch "))
    script = Path(shlex.split(sbatch)[3])
    assert script.is_file() and str(script).startswith(site) and script.stat().st_mode & 0o111
    assert "scontrol requeue" in script.read_text()
    printed = run("launch", "--config", "demo", "launch.launcher=accelerate", "--dry-run")
    assert str(Path(site, "vlp", "launch", "accelerate_deepspeed.yaml")) in printed
    run("launch", "init", "mine")
    assert (away / "mine" / "configs" / "demo.yaml").read_text() == (REPO / "configs" / "demo.yaml").read_text()
    # the demo's preset resolves from the package: its config prints without a checkout
    shown = run("train", "--config", "configs/demo.yaml", "--print-config")
    assert "name: vlp-tiny-rn" in shown
