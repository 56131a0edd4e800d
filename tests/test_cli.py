"""The command line as a new user meets it: help, --version, -v, exit codes, unknown settings,
``config show`` and ``explain`` (unit tier: no servers)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from annotate import records
from faceloop import cli
from faceloop.cli import build_parser, iter_parsers, main
from faceloop.config import DEFAULT_POLICY, SourceSpec, load_settings
from faceloop.errors import EXIT_FAILED, EXIT_LOCKED, EXIT_USAGE, ConfigError, StoreLockedError
from storage import layout
from storage.objectstore import ObjectStore, open_store
from storage.tables import append_images, write_group

REPO = Path(__file__).resolve().parents[1]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("FACELOOP_"):
            monkeypatch.delenv(name)


# --- help and version ----------------------------------------------------------------------


def test_help_says_what_faceloop_is(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    description = out.split("\n\n")[1]
    assert description.startswith("faceloop turns photo albums and ID-card photos")
    assert "faceloop/commands" not in out  # no developer note
    assert "exit codes: 0 ok, 1" in out
    for command in ("refresh", "datasets", "review", "explain", "config", "models"):
        assert f"    {command} " in out


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    skip = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def test_every_command_and_option_has_help_with_its_default() -> None:
    parser = build_parser()
    parsers = list(iter_parsers(parser))
    assert len(parsers) > 20
    for p in parsers:
        if p is not parser:
            assert p.description, f"{p.prog}: no description"
            assert "\n" not in p.description.strip(), f"{p.prog}: description not one line"
        formatter = p._get_formatter()
        for action in _options(p):
            assert action.help, f"{p.prog} {action.option_strings or action.dest}: no help"
            default = action.default
            if (
                action.option_strings
                and default not in (None, False, argparse.SUPPRESS)
                and not isinstance(action, argparse._CountAction)
            ):
                shown = formatter._get_help_string(action) or ""
                assert "default" in shown.lower(), f"{p.prog} {action.option_strings}: {shown}"
    # Rendered: a default appears in the text the user reads.
    eval_help = parser._subparsers._group_actions[0].choices["eval"].format_help()  # type: ignore[union-attr]
    assert "(default: ./var/eval)" in " ".join(eval_help.split())


def test_version(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out.strip() == f"faceloop {importlib.metadata.version('faceloop')}"

    def missing(_name: str) -> str:
        raise importlib.metadata.PackageNotFoundError("faceloop")

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version() == _pyproject_version()
    import faceloop

    assert faceloop.__version__ == _pyproject_version()  # a library user's way to ask


def test_the_core_install_s_program_says_it_needs_the_pipeline_install() -> None:
    """The core install (the training reader) ships the ``faceloop`` program without the
    pipeline's modules: it died with a ModuleNotFoundError traceback from its first import."""
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'yaml' or name.startswith('yaml.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from faceloop.cli import main\n"
        "sys.exit(main(['--version']))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 1, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("faceloop: error: the faceloop command needs the pipeline install")
    assert "'yaml'" in line and "Traceback" not in out.stderr


def _pyproject_version() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


# --- -v and exit codes ---------------------------------------------------------------------


def test_quiet_keeps_the_lines_of_counts_off_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh from cron printed a line of counts per stage on stderr whatever was set
    (PREFECT_LOGGING_LEVEL too): the job mailed on every run. `-q` leaves warnings and errors."""
    import logging

    import faceloop.commands.core as core

    seen: list[int] = []

    def refresh(args: object) -> int:
        seen.append(logging.getLogger("faceloop.stages").getEffectiveLevel())
        return 0

    monkeypatch.setattr(core, "cmd_refresh", refresh)
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # no temporary server
    stages = logging.getLogger("faceloop.stages")
    try:
        for argv in (
            ["-q", "refresh"],
            ["refresh", "--quiet"],
            ["refresh"],
            ["refresh", "-q", "-v"],
        ):
            stages.setLevel(logging.NOTSET)
            assert main([*argv, "--store", str(tmp_path)]) == 0
    finally:
        stages.setLevel(logging.NOTSET)
    assert seen[:2] == [logging.WARNING, logging.WARNING]
    assert seen[2] == logging.INFO and seen[3] <= logging.INFO  # -v wins over -q


def test_verbose_before_or_after_the_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    assert parser.parse_args(["-v", "config", "show"]).verbose == 1
    after = parser.parse_args(["config", "show", "-vv"])
    assert after.verbose == 0 and after.sub_verbose == 2
    assert parser.parse_args(["datasets", "list", "-v"]).sub_verbose == 1

    store = str(tmp_path)
    code, _, err = run(capsys, "explain", "nope", "--store", store)
    assert code == EXIT_FAILED
    assert err.splitlines() == [f"faceloop: error: no face or image 'nope' in the store {store}"]
    code, _, err = run(capsys, "explain", "nope", "--store", store, "-v")
    assert code == EXIT_FAILED
    assert "Traceback" in err and err.splitlines()[-1].startswith("faceloop: error: no face")


def test_datasets_and_train_take_either_name_for_the_dataset() -> None:
    """`datasets show --dataset faces` failed ("version must be N ... not 'faces'"): train
    takes --dataset where datasets take --name. Both take both."""
    parser = build_parser()
    assert parser.parse_args(["datasets", "show", "--dataset", "faces"]).name == "faces"
    assert parser.parse_args(["datasets", "list", "--name", "faces"]).name == "faces"
    t = parser.parse_args(["train", "--store", "s", "--name", "faces", "--out", "o"])
    assert t.dataset == "faces"


def test_debug_logging_keeps_the_s3_and_http_libraries_at_info(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """-vv turned on botocore's debug log: every key read (photo paths, subject folders) and
    the requests' Authorization headers went to stderr."""
    import logging

    run(capsys, "-vv", "config", "show")
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (RuntimeError("boom\nsecond line"), EXIT_FAILED),
        (ConfigError("bad setting"), EXIT_USAGE),
        (StoreLockedError("held by refresh r1"), EXIT_LOCKED),
    ],
)
def test_errors_are_one_line_with_their_exit_code(
    exc: Exception,
    code: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import faceloop.commands.config as config_cmd

    def fail(_args: argparse.Namespace) -> int:
        raise exc

    monkeypatch.setattr(config_cmd, "cmd_show", fail)
    got, _, err = run(capsys, "config", "show")
    assert got == code
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("faceloop: error: ")
    assert "Traceback" not in err
    if isinstance(exc, RuntimeError):
        assert lines[0] == (
            "faceloop: error: RuntimeError: boom second line (-v shows the traceback)"
        )


def test_bad_dataset_name_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "datasets", "list", "--store", str(tmp_path), "--name", "bad/name")
    assert code == EXIT_USAGE
    assert "bad dataset name 'bad/name'" in err and "Traceback" not in err
    code, _, err = run(capsys, "train", "--store", str(tmp_path), "--dataset", "../x", "--out", "o")
    assert code == EXIT_USAGE and "bad dataset name" in err


# --- unknown settings ----------------------------------------------------------------------


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "ray:\n  num_gpu_per_actor: 1\n",
            "ray.num_gpu_per_actor: unknown setting (did you mean num_gpus_per_actor?)",
        ),
        (
            "policy:\n  insightface:\n    merj: 0.5\n",
            "policy.insightface.merj: unknown setting (did you mean merge?)",
        ),
        ("stor: /x\n", "stor: unknown setting (did you mean store?)"),
        (
            "sources:\n  - kind: album\n    uri: /a\n    urii: /b\n",
            "sources.0.urii: unknown setting (did you mean uri?)",
        ),
        # These two sections took unknown keys: a mistyped lock.wait_seconds exited 3 at once.
        ("lock:\n  wait_secnds: 30\n", "lock.wait_secnds: unknown setting (did you mean"),
        ("storage:\n  dedline_seconds: 5\n", "storage.dedline_seconds: unknown setting (did"),
    ],
)
def test_unknown_keys_are_refused_with_their_path(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _yaml(tmp_path, text)
    with pytest.raises(ConfigError, match="unknown setting") as info:
        load_settings(path)
    assert message in str(info.value)
    code, _, err = run(capsys, "config", "show", "--config", path)
    assert code == EXIT_USAGE
    assert len(err.splitlines()) == 1 and message in err


def test_unknown_nested_environment_names_are_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FACELOOP_RAY__NUM_GPU_PER_ACTOR", "1")
    code, _, err = run(capsys, "config", "show")
    assert code == EXIT_USAGE
    assert "FACELOOP_RAY__NUM_GPU_PER_ACTOR" in err
    assert "ray.num_gpu_per_actor: unknown setting (did you mean num_gpus_per_actor?)" in err
    monkeypatch.delenv("FACELOOP_RAY__NUM_GPU_PER_ACTOR")
    monkeypatch.setenv("FACELOOP_POLICY__OPENCV__MERGE", "0.7")
    monkeypatch.setenv("FACELOOP_RAY__ACTORS", "3")
    settings = load_settings()
    assert settings.policy["opencv"].merge == 0.7 and settings.ray.actors == 3


def test_a_nested_setting_named_with_one_underscore_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An operator set FACELOOP_LOCK_WAIT_SECONDS=3600: it set nothing, and the queued run
    exited 3 instead of waiting for the lock."""
    monkeypatch.setenv("FACELOOP_LOCK_WAIT_SECONDS", "3600")
    code, _, err = run(capsys, "config", "show")
    assert code == EXIT_USAGE
    assert "FACELOOP_LOCK_WAIT_SECONDS sets nothing" in err and "FACELOOP_LOCK__WAIT_SECONDS" in err
    monkeypatch.delenv("FACELOOP_LOCK_WAIT_SECONDS")
    monkeypatch.setenv("FACELOOP_HOME", "/somewhere")  # other tools' names stay allowed
    monkeypatch.setenv("FACELOOP_MODELS", "/models")
    monkeypatch.setenv("FACELOOP_TEST_CRASH_AT", "")
    assert run(capsys, "config", "show")[0] == 0


def test_a_bad_value_from_the_environment_names_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad FACELOOP_* value was reported as the YAML file's ("invalid configuration
    (team.yaml): ray.actors ..." for a file without a ray section), and a list given as a
    plain string as pydantic's 'error parsing value ... from source "_EnvSource"'."""
    path = _yaml(tmp_path, "store: /tmp/x\n")
    monkeypatch.setenv("FACELOOP_RAY__ACTORS", "x")
    code, _, err = run(capsys, "config", "show", "--config", path)
    assert code == EXIT_USAGE and "(from environment variable FACELOOP_RAY__ACTORS)" in err
    monkeypatch.delenv("FACELOOP_RAY__ACTORS")
    monkeypatch.setenv("FACELOOP_SOURCES", "s3://raw/idcards")
    code, _, err = run(capsys, "config", "show", "--config", path)
    assert code == EXIT_USAGE
    assert "environment variable FACELOOP_SOURCES: not valid JSON" in err
    assert "_EnvSource" not in err and len(err.splitlines()) == 1
    # One key of a section: that variable is named, with a list's example, not the section's.
    monkeypatch.delenv("FACELOOP_SOURCES")
    monkeypatch.setenv("FACELOOP_LIMITS__EXTENSIONS", ".jpg,.png")
    code, _, err = run(capsys, "config", "show", "--config", path)
    assert code == EXIT_USAGE
    assert "environment variable FACELOOP_LIMITS__EXTENSIONS: not valid JSON" in err
    assert "kind" not in err
    # A top-level setting's name mistyped was ignored (the refresh made a store under ./var).
    monkeypatch.delenv("FACELOOP_LIMITS__EXTENSIONS")
    monkeypatch.setenv("FACELOOP_STOR", "/data/x")
    code, _, err = run(capsys, "config", "show", "--config", path)
    assert code == EXIT_USAGE and "did you mean FACELOOP_STORE?" in err
    monkeypatch.delenv("FACELOOP_STOR")
    # Nor one of the variables read beside the settings (requests went to AWS's endpoint).
    monkeypatch.setenv("FACELOOP_S3_ENDPIONT", "http://127.0.0.1:8333")
    code, _, err = run(capsys, "config", "show", "--config", path)
    assert code == EXIT_USAGE and "did you mean FACELOOP_S3_ENDPOINT?" in err
    monkeypatch.delenv("FACELOOP_S3_ENDPIONT")
    monkeypatch.setenv("FACELOOP_CACHE_DIR", str(tmp_path))  # not a setting, and no typo
    for name in ("S3_RETRIES", "S3_DEADLINE_S", "S3_READ_TIMEOUT_S", "S3_RETRY_BASE_S"):
        monkeypatch.setenv(f"FACELOOP_{name}", "3")
    assert run(capsys, "config", "show", "--config", path)[0] == 0


def test_a_policy_key_that_names_no_recognizer_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`policy: {edgeface: ...}` (the built-in is edgeface_s_gamma_05) was accepted and unused
    without a word; such a key is a registered model's name, or a typo."""
    import logging

    with caplog.at_level(logging.WARNING, logger="faceloop.config"):
        load_settings(_yaml(tmp_path, "policy:\n  edgeface:\n    merge: 0.7\n"))
    assert any("policy.edgeface names no backend" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="faceloop.config"):
        load_settings(_yaml(tmp_path, "policy:\n  edgeface_s_gamma_05:\n    merge: 0.7\n"))
    assert not caplog.records


def test_wrong_types_are_one_line_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_yaml(tmp_path, "ray:\n  actors: many\n"))
    assert "ray.actors:" in str(info.value) and "'many'" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_still_load(name: str) -> None:
    settings = load_settings(REPO / "configs" / name)
    if name.startswith("calibrated-"):
        backend = name.removeprefix("calibrated-").removesuffix(".yaml")
        assert settings.models.backend == backend
        # The calibrated configs and the package defaults say the same.
        assert settings.thresholds == DEFAULT_POLICY[backend]


def test_a_key_given_twice_in_a_config_is_refused(tmp_path: Path) -> None:
    """PyYAML keeps a repeated key's last value: a second ``sources:`` block silently dropped
    the first one's photos from every refresh."""
    cfg = tmp_path / "twice.yaml"
    cfg.write_text(
        "store: ./s\nsources:\n  - {kind: album, uri: ./albums}\n"
        "limits: {max_image_bytes: 9}\nsources:\n  - {kind: idcard, uri: ./ids}\n"
    )
    with pytest.raises(ConfigError, match=r"'sources' is given twice \(lines 2 and 5\)"):
        load_settings(cfg)
    cfg.write_text("limits:\n  extensions: [.jpg]\n  extensions: [.png]\n")
    with pytest.raises(ConfigError, match="'extensions' is given twice"):
        load_settings(cfg)
    # a merge key that an explicit key overrides is not a repeat
    cfg.write_text(
        "store: ./s\nsources:\n  - &a {kind: album, uri: ./albums}\n  - {<<: *a, uri: ./more}\n"
    )
    assert [s.uri for s in load_settings(cfg).sources] == [
        str(Path("albums").absolute()),
        str(Path("more").absolute()),
    ]


def test_configs_loaded_in_two_threads_at_once_each_get_their_own(tmp_path: Path) -> None:
    """load_settings handed the YAML path to its source through a process-wide environment
    variable: two threads loading two configs got each other's store now and then, and the
    variable was left set behind them (a later Settings() read one of those files)."""
    import os
    import threading

    from faceloop.config import Settings

    paths = {}
    for name in ("a", "b"):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(f"store: {tmp_path / ('store-' + name)}\n")
    wrong: list[str] = []

    def load(name: str) -> None:
        for _ in range(300):
            if load_settings(paths[name]).store != str(tmp_path / f"store-{name}"):
                wrong.append(name)

    threads = [threading.Thread(target=load, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert not any("FACELOOP_YAML" in k for k in os.environ)
    assert "store-" not in Settings().store


def test_a_bad_setting_given_beside_the_config_file_is_not_blamed_on_the_file(
    tmp_path: Path,
) -> None:
    """A deployment's ``store`` parameter inside its ``sources`` parameter was reported as
    "invalid configuration (configs/team.yaml): ... overlap": the operator looked in the file."""
    from faceloop.config import SourceSpec

    cfg = tmp_path / "team.yaml"
    cfg.write_text("ray: {actors: 1}\n")
    (tmp_path / "albums").mkdir()
    with pytest.raises(ConfigError, match=r"\(.*team.yaml; sources, store given beside it\)"):
        load_settings(
            cfg,
            store=str(tmp_path / "albums" / "store"),
            sources=[SourceSpec(kind="album", uri=str(tmp_path / "albums"))],
        )


def test_dataset_statuses_and_name_are_checked_with_the_config(tmp_path: Path) -> None:
    """`dataset: {statuses: [autoo, humen]}` was taken and published an empty latest version
    (no face has such a status); `dataset: {name: ../evil}` failed the refresh after its label
    stage (exit 1) and every refresh after it."""
    with pytest.raises(ConfigError, match=r"'autoo': did you mean 'auto'\?"):
        load_settings(_yaml(tmp_path, "dataset:\n  statuses: [autoo, human]\n"))
    with pytest.raises(ConfigError, match="nothing to publish"):
        load_settings(_yaml(tmp_path, "dataset:\n  statuses: []\n"))
    with pytest.raises(ConfigError, match=r"dataset\.name"):
        load_settings(_yaml(tmp_path, "dataset:\n  name: ../evil\n"))
    ok = load_settings(_yaml(tmp_path, "dataset:\n  name: faces-v2.x\n  statuses: [auto]\n"))
    assert ok.dataset.name == "faces-v2.x" and ok.dataset.statuses == ["auto"]


def test_review_url_credentials_are_refused_without_echoing_them(tmp_path: Path) -> None:
    """A password in review.url was printed in the refresh's "not reachable" warning and
    written to Prefect's logs and run records; Label Studio takes the token instead."""
    with pytest.raises(ConfigError) as info:
        load_settings(_yaml(tmp_path, "review:\n  url: http://admin:pw-SECRET@127.0.0.1:8080\n"))
    assert "review.url" in str(info.value) and "pw-SECRET" not in str(info.value)


def test_home_in_models_root_review_data_dir_and_config_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models.root: ~/models` made a folder named "~" in the working directory, and
    `review.data_dir: ~/ls` was not found; `--config=~/c.yaml` was "not found"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("models:\n  root: ~/models\nreview:\n  data_dir: ~/ls\n")
    s = load_settings("~/c.yaml")
    assert s.models.root == str(tmp_path / "models")
    assert s.review.data_dir == str(tmp_path / "ls")


def test_environment_variables_and_dot_dot_in_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`store: $TMPDIR/mystore` made a folder named "$TMPDIR" in the working directory (sources,
    models.root and review.data_dir too); a source given as `albums/a1/..` was another folder
    to discovery (every file hashed again and counted moved at each change of spelling)."""
    monkeypatch.setenv("FL_BASE", str(tmp_path))
    s = load_settings(
        _yaml(
            tmp_path,
            "store: $FL_BASE/store\nsources:\n  - {kind: album, uri: '${FL_BASE}/in/a1/..'}\n"
            "models:\n  root: $FL_BASE/models\nreview:\n  data_dir: $FL_BASE/ls\n",
        )
    )
    assert s.store == str(tmp_path / "store") and s.sources[0].uri == str(tmp_path / "in")
    assert s.models.root == str(tmp_path / "models")
    assert s.review.data_dir == str(tmp_path / "ls")
    monkeypatch.delenv("FL_BASE")
    with pytest.raises(ConfigError, match="environment variable FL_BASE, which is not set"):
        load_settings(_yaml(tmp_path, "store: $FL_BASE/store\n"))
    # Set to nothing (an `.env` line `FL_BASE=`): the store was the working directory, and
    # `${FL_BASE}/` the file system's root.
    monkeypatch.setenv("FL_BASE", "")
    for text in ("store: $FL_BASE\n", "store: ${FL_BASE}/\n", "models:\n  root: $FL_BASE\n"):
        with pytest.raises(ConfigError, match="environment variable FL_BASE, which is empty"):
            load_settings(_yaml(tmp_path, text))
    with pytest.raises(ConfigError, match="the file system's root"):
        load_settings(_yaml(tmp_path, "store: /\n"))
    # `$$` is a `$` of the name (Windows shares' `$RECYCLE.BIN` were refused as a variable).
    s = load_settings(
        _yaml(tmp_path, f"store: {tmp_path}/s\nsources:\n  - {{kind: album, uri: '/p/$$R.BIN'}}\n")
    )
    assert s.sources[0].uri == "/p/$R.BIN"


def test_dot_dot_after_a_symlink_is_the_folder_the_system_reads(tmp_path: Path) -> None:
    """`data/link/../photos`, `link` a symlink to `real/deep`: the system reads `real/photos`,
    while the text fold recorded `data/photos`, a folder that does not exist."""
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "real" / "photos").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "link").symlink_to(tmp_path / "real" / "deep")
    given = f"{tmp_path}/data/link/../photos"
    s = load_settings(
        _yaml(
            tmp_path, f"store: {tmp_path}/data/./s\nsources:\n  - {{kind: album, uri: '{given}'}}\n"
        )
    )
    assert s.sources[0].uri == str((tmp_path / "real" / "photos").resolve())
    assert s.store == str(tmp_path / "data" / "s")


def test_an_empty_config_file_is_said_and_settings_out_of_order_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty config (or one of comments) ran on every default (a store in ./var/store) with
    no word; an attach_margin above any cosine margin (2) was accepted, turning attaching off in
    silence."""
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("# nothing yet\n")
    with caplog.at_level("WARNING", logger="faceloop.config"):
        load_settings(str(cfg))
        load_settings(str(cfg))
    said = [r for r in caplog.records if "holds no settings" in r.getMessage()]
    assert len(said) == 1  # once per file
    # min_face_px above good_face_px is a plain tuning (too_small below it, size factor 1 from
    # it on); it was refused for a while as if such faces scored full size.
    q = load_settings(_yaml(tmp_path, "quality:\n  min_face_px: 80\n")).quality
    from tasks.quality import gate, size_factor

    assert size_factor(79, q) == 0.0 and size_factor(80, q) == 1.0
    assert gate("album", 79, 1.0, q) is not None and gate("album", 80, 1.0, q) is None
    with pytest.raises(ConfigError, match=r"cluster\.attach_margin"):
        load_settings(_yaml(tmp_path, "cluster:\n  attach_margin: 5\n"))


@pytest.mark.parametrize("value", ["''", "edgeface_s", "w600k"])
def test_an_empty_or_misspelt_recognizer_is_a_config_error(tmp_path: Path, value: str) -> None:
    """`models.recognizer: ""` (an unset shell variable in FACELOOP_MODELS__RECOGNIZER) was read
    as null: the next refresh re-embedded every stored face with another recognizer. A misspelt
    built-in name failed at the refresh, exit 1, as a missing "registered recognizer"."""
    with pytest.raises(ConfigError, match=r"is not a built-in recognizer .*edgeface_s_gamma_05"):
        load_settings(_yaml(tmp_path, f"models:\n  recognizer: {value}\n"))
    ok = load_settings(_yaml(tmp_path, "models:\n  recognizer: /models/mine.onnx\n"))
    assert ok.models.recognizer == "/models/mine.onnx"


def test_doctor_and_explain_read_a_config_given_beside_store(tmp_path: Path, capsys) -> None:
    """`doctor --store S --config missing.yaml` (and explain) ran on, exit 0; every other command
    refuses a missing config, exit 2."""
    from faceloop.cli import main

    store = str(tmp_path / "store")
    open_store(store).write_bytes("state/x.json", b"{}")
    for cmd in (["doctor"], ["explain", "some/photo.jpg"]):
        assert main([*cmd, "--store", store, "--config", str(tmp_path / "nope.yaml")]) == 2
        assert "config file not found" in capsys.readouterr().err


def test_a_store_inside_a_source_by_dot_dot_or_symlink_is_refused(tmp_path: Path) -> None:
    """The overlap check compared the strings: a store given as ./nothere/../in/albums/zstore,
    or through a symlink, was accepted and listed as photos at every refresh."""
    albums = tmp_path / "in" / "albums"
    albums.mkdir(parents=True)
    (tmp_path / "link").symlink_to(albums)
    for store in (
        tmp_path / "nothere" / ".." / "in" / "albums" / "zstore",
        tmp_path / "link" / "s",
    ):
        with pytest.raises(ConfigError, match="overlap"):
            load_settings(
                None, store=str(store), sources=[SourceSpec(kind="album", uri=str(albums))]
            )


# --- config show -----------------------------------------------------------------------------


def test_config_show_masks_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from faceloop.commands.config import MASK, mask_secrets

    monkeypatch.setenv("FACELOOP_REVIEW__TOKEN", "s3cr3t-token")
    path = _yaml(tmp_path, f"store: {tmp_path / 'store'}\nray:\n  actors: 5\n")
    code, out, _ = run(capsys, "config", "show", "--config", path)
    assert code == 0 and "s3cr3t" not in out
    shown = yaml.safe_load(out)
    assert shown["review"]["token"] == MASK
    assert shown["ray"]["actors"] == 5 and shown["store"] == str(tmp_path / "store")
    code, out, _ = run(capsys, "config", "show", "--json")
    assert code == 0 and "s3cr3t" not in out
    assert json.loads(out)["review"]["token"] == MASK
    monkeypatch.delenv("FACELOOP_REVIEW__TOKEN")
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    code, out, _ = run(capsys, "config", "show", "--json")
    assert json.loads(out)["review"]["token"] is None  # unset stays visibly unset
    assert mask_secrets({"url": "postgres://u:pw@db/x", "api_key": "k", "n": 1}) == {
        "url": f"postgres://u:{MASK}@db/x",
        "api_key": MASK,
        "n": 1,
    }


# --- explain ---------------------------------------------------------------------------------

ALBUM = "holiday"


def _face(fid: str, index: int, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {
        "face_id": fid,
        "image_uri": "/photos/holiday/beach.jpg",
        "image_sha256": "a" * 64,
        "source_kind": "album",
        "source_group": ALBUM,
        "role": "album",
        "face_index": index,
        "det_score": 0.91,
        "face_px": 80.0,
        "blur": 120.5,
        "yaw": 4.0,
        "pitch": -2.0,
        "quality": 0.82,
        "model": "w600k_mbf.onnx@sha256:" + "b" * 64,
        "detector": "scrfd_500m_bnkps.onnx@sha256:" + "c" * 64,
        "cluster_id": f"{ALBUM}/0",
        "identity_id": "id-0001",
        "status": "auto",
        "reason": "cluster: album cluster of 3",
        "reason_code": "cluster",
        "score": 0.77,
        "run_id": "r1",
        "labelled_run_id": "r1",
    }
    row.update(kw)
    return row


# The image row of the photo the explain store's faces come from.
BEACH = {
    "image_uri": "/photos/holiday/beach.jpg",
    "image_sha256": "a" * 64,
    "size_bytes": 1234,
    "source_kind": "album",
    "source_group": ALBUM,
    "role": "album",
    "status": "ok",
    "width": 640,
    "height": 480,
    "n_faces": 2,
    "run_id": "r1",
}


def _build_store(root: Path) -> ObjectStore:
    store = open_store(str(root))
    rows = [
        _face("face-ok", 0),
        _face(
            "face-out",
            1,
            status="human",
            reason="human_reject: annotator rejected (was outlier: similarity 0.21 < 0.30)",
            reason_code="human_reject",
            score=0.21,
            identity_id=None,
            labelled_run_id="r2",
        ),
        _face(
            "face-small",
            0,
            image_uri="/photos/holiday/crowd.jpg",
            image_sha256="d" * 64,
            status="rejected",
            reason="too_small: face 14 px < 20 px",
            reason_code=None,  # an older row: the code comes from the reason
            face_px=14.0,
            quality=0.05,
            score=None,
            identity_id=None,
            cluster_id=None,
        ),
    ]
    write_group(store, "album", ALBUM, pa.Table.from_pylist(rows))
    append_images(store, "r1", pa.Table.from_pylist([BEACH]))
    records.write_task_records(
        store,
        f"{layout.REVIEW_TASKS}/t1.parquet",
        [
            {
                "key": "cc-id-0001-r1",
                "kind": "cluster_check",
                "project_id": 3,
                "task_id": 41,
                "face_ids": ["face-out"],
                "shown": ["face-ok", "face-out"],
                "identity_ids": ["id-0001"],
                "suspects": ["face-out"],
                "proposal": "id-0001",
                "score": 0.21,
                "model_version": "m1",
                "pushed_at": "2026-01-01T10:00:00+00:00",
            }
        ],
    )
    records.write_answers(
        store,
        [
            {
                "task_key": "cc-id-0001-r1",
                "kind": "cluster_check",
                "project_id": 3,
                "task_id": 41,
                "annotation_id": 7,
                "annotator": "ann@example.org",
                "updated_at": "2026-01-01T11:00:00+00:00",
                "cancelled": False,
                "decision": "reject",
                "marked": ["face-out"],
                "raw_json": "{}",
                "pulled_at": "2026-01-01T11:05:00+00:00",
            }
        ],
    )
    store.write_parquet(
        f"{layout.REVIEW_APPLIED}/a1.parquet",
        pa.Table.from_pylist(
            [
                {
                    "task_key": "cc-id-0001-r1",
                    "kind": "cluster_check",
                    "decision": "reject",
                    "conflict": False,
                    "annotators": ["ann@example.org"],
                    "annotation_ids": [7],
                    "settled": 1,
                    "run_id": "r2",
                    "applied_at": "2026-01-01T11:06:00+00:00",
                }
            ],
            schema=records.APPLIED_SCHEMA,
        ),
    )
    return store


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_explain_a_face(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    _build_store(root)
    before = _snapshot(root)
    code, out, err = run(capsys, "explain", "face-out", "--store", str(root))
    assert code == 0, err
    assert "face face-out" in out
    assert "status:    human" in out
    assert "reason:    human_reject  (human_reject: annotator rejected" in out
    assert "score:     0.210" in out
    assert "cluster: holiday/0" in out
    assert "det_score 0.910" in out and "size 80 px" in out and "sharpness 120.5" in out
    assert "pose yaw 4.0 pitch -2.0 deg" in out
    assert "model:     w600k_mbf.onnx@sha256:" in out
    assert "detected in r1, last labelled in r2" in out
    assert "task cc-id-0001-r1 (cluster_check, project 3, task id 41)" in out
    assert "answer by ann@example.org at 2026-01-01T11:00:00+00:00: reject, marked face-out" in out
    assert "applied reject in run r2" in out
    assert "image /photos/holiday/beach.jpg" in out  # its image record

    code, out, _ = run(capsys, "explain", "face-out", "--store", str(root), "--json")
    got = json.loads(out)
    assert got["kind"] == "face"
    assert got["face"]["reason_code"] == "human_reject" and got["face"]["identity_id"] is None
    assert got["review"][0]["answers"][0]["decision"] == "reject"
    assert got["review"][0]["applied"][0]["settled"] == 1
    assert "embedding" not in got["face"] and "aligned_jpeg" not in got["face"]
    assert _snapshot(root) == before, "explain is read-only"


def test_explain_names_the_identity_as_label_studio_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Label Studio's task titles show a pseudonym of the identity ("Identity 3f2c...: do all
    faces show the same person?"), which explain did not print: an annotation lead could not
    match a task to the faces it was about."""
    from storage.secret import pseudonym

    root = tmp_path / "store"
    store = _build_store(root)
    code, out, _ = run(capsys, "explain", "face-ok", "--store", str(root))
    assert code == 0 and "Label Studio:" not in out  # no secret: nothing made up, or created
    shown = pseudonym(store, "identity", "id-0001")
    code, out, _ = run(capsys, "explain", "face-ok", "--store", str(root))
    assert f"identity:  id-0001 (Label Studio: {shown})" in out


def _add_subject(store: ObjectStore, subject: str = "S004") -> None:
    """An ID-card subject: its ID photo and a live photo in review (an ID-pair task), both
    faces of its identity (its subject id), beside the album of :func:`_build_store`."""
    photos = [("id.jpg", "e" * 64, "id"), ("live1.jpg", "f" * 64, "live")]
    images, faces = [], []
    for name, sha, role in photos:
        where = {"image_uri": f"/ids/{subject}/{name}", "image_sha256": sha}
        where |= {"source_kind": "idcard", "source_group": subject, "role": role}
        images.append(where | {"status": "ok", "n_faces": 1, "run_id": "r1", "size_bytes": 9})
        live = role == "live"
        faces.append(
            _face(
                f"face-{role}",
                0,
                **where,
                cluster_id=None,
                identity_id=subject,
                status="review" if live else "auto",
                reason="idcard_review: similarity 0.35 in [0.30, 0.47)" if live else "idcard: ID",
                reason_code="idcard_review" if live else "idcard",
                score=0.35 if live else None,
            )
        )
    append_images(store, "r1i", pa.Table.from_pylist(images))
    write_group(store, "idcard", subject, pa.Table.from_pylist(faces))


def test_explain_names_a_subject_as_label_studio_and_the_dataset_classes_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """explain printed an ID subject's identity with its pseudonym of kind "identity", which
    nothing else shows: its ID-pair tasks show the subject pseudonym and a publish names its
    class ``subject-<that pseudonym>`` (README, Privacy), so a DPO could not match them."""
    from annotate import render, review, sync
    from faceloop.config import PolicyThresholds
    from faceloop.vocab import TaskKind
    from storage.secret import pseudonym
    from storage.tables import faces_files, read_faces, subject_keys
    from tasks.publish import published_ids

    root = tmp_path / "store"
    store = _build_store(root)
    _add_subject(store)
    pseudonym(store, "identity", "-")  # the secret a push makes
    # What a publish writes as the subject's class, and what a push sends Label Studio.
    keys = pa.table({"face_id": ["face-live"], "identity_id": ["S004"]})
    (klass,) = published_ids(store, keys, subject_keys(faces_files(store))).column(1).to_pylist()
    items, _ = review.plan_items(read_faces(store).to_pylist(), thresholds=PolicyThresholds())
    (pair,) = [i for i in items if i.kind == "idcard_pair"]
    sent = render.build_task(sync.ls_item(store, pair), {"face-id": b"", "face-live": b""}, "m")
    assert klass == f"subject-{sent['data']['subject']}"
    code, out, _ = run(capsys, "explain", "face-live", "--store", str(root))
    assert code == 0
    assert f"identity:  S004 (Label Studio: {sent['data']['subject']})" in out
    code, out, _ = run(capsys, "explain", "face-live", "--store", str(root), "--json")
    assert f"subject-{json.loads(out)['face']['identity_in_review']}" == klass
    # An album identity: as its tasks' titles show it.
    check = review.ReviewItem(
        kind=TaskKind.CLUSTER_CHECK,
        key="cluster_check:id-0001:x",
        face_ids=("face-ok",),
        shown=("face-ok",),
        proposal="confirm",
        score=0.5,
        identity_ids=("id-0001",),
    )
    (shown,) = sync.ls_item(store, check).identity_ids
    code, out, _ = run(capsys, "explain", "face-ok", "--store", str(root))
    assert f"identity:  id-0001 (Label Studio: {shown})" in out


def test_explain_answers_an_access_request_for_a_subject_or_an_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`explain S004` (an ID subject's folder), `explain id-0001` (an identity) and `explain`
    of the pseudonym Label Studio shows for an identity said "no face or image ... in the
    store": a subject access request needed Parquet queries. They list the person's faces,
    photos and the dataset versions whose classes hold them."""
    from storage.secret import pseudonym
    from storage.versions import DatasetWriter

    root = tmp_path / "store"
    store = _build_store(root)
    _add_subject(store)
    # An album photo whose face was put in the subject's identity.
    pier = BEACH | {"image_uri": "/photos/holiday/pier.jpg", "image_sha256": "9" * 64}
    append_images(store, "r2", pa.Table.from_pylist([pier]))
    album = [
        *_album_faces(store),
        _face(
            "face-pier", 0, image_uri=pier["image_uri"], image_sha256="9" * 64, identity_id="S004"
        ),
    ]
    write_group(store, "album", ALBUM, pa.Table.from_pylist(album))
    klass = "subject-" + pseudonym(store, "subject", "S004")
    for rows in (
        [("face-ok", "id-0001"), ("face-live", klass), ("face-pier", klass)],
        [("face-ok", "id-0001")],
    ):
        with DatasetWriter(store, "faces", identities=[i for _, i in rows]) as w:
            w.write(
                pa.Table.from_pylist(
                    [
                        {"face_id": f, "identity_id": i, "image": b"j", "quality": 1.0}
                        for f, i in rows
                    ]
                )
            )
    before = _snapshot(root)

    code, out, err = run(capsys, "explain", "S004", "--store", str(root))
    assert code == 0, err
    assert f"person: ID subject 'S004', identity S004 (Label Studio: {klass[8:]})" in out
    assert "holds:     3 face(s) in 3 photo(s)" in out
    assert "face face-id" in out and "face face-live" in out and "face face-pier" in out
    assert "face face-ok" not in out and "image /ids/S004/id.jpg" in out
    assert f"datasets:\n  faces v1: class {klass} (2 face(s))\n" in out
    for target in ("S004", klass, klass[8:], pseudonym(store, "identity", "S004")):
        code, out, _ = run(capsys, "explain", target, "--store", str(root), "--json")
        got = json.loads(out)
        assert code == 0 and got["kind"] == "person" and got["subject"] == "S004"
        assert {f["face_id"] for f in got["faces"]} == {"face-id", "face-live", "face-pier"}
        assert got["datasets"] == [{"dataset": "faces", "version": 1, "class": klass, "faces": 2}]

    for target in ("id-0001", pseudonym(store, "identity", "id-0001")):
        code, out, _ = run(capsys, "explain", target, "--store", str(root), "--json")
        got = json.loads(out)
        assert code == 0 and got["kind"] == "person" and got["identity"] == "id-0001"
        assert [f["face_id"] for f in got["faces"]] == ["face-ok"]
        assert [r["image_uri"] for r in got["images"]] == ["/photos/holiday/beach.jpg"]
        assert [(d["version"], d["class"]) for d in got["datasets"]] == [
            (1, "id-0001"),
            (2, "id-0001"),
        ]
        assert got["review"][0]["task"] == "cc-id-0001-r1"  # face-ok was shown in it
    code, out, _ = run(capsys, "explain", "id-0001", "--store", str(root))
    assert "person: identity id-0001 (Label Studio: " in out
    assert "faces of /photos/holiday/beach.jpg (1):" in out
    assert "  faces v2: class id-0001 (1 face(s))" in out
    code, _, err = run(capsys, "explain", "id-nobody", "--store", str(root))
    assert code == 1 and "no face or image 'id-nobody'" in err
    assert _snapshot(root) == before, "explain is read-only"


def _album_faces(store: ObjectStore) -> list[dict[str, object]]:
    from storage.tables import read_faces

    return read_faces(store, kinds=["album"]).to_pylist()


def test_explain_of_a_path_that_held_two_photos_tells_them_apart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After two files swapped names, explain of one path listed both contents' faces as
    "faces of this content", and the path's older record read plain "ok"."""
    root = tmp_path / "store"
    store = open_store(str(root))
    uri = "/photos/holiday/beach.jpg"
    write_group(
        store,
        "album",
        ALBUM,
        pa.Table.from_pylist(
            [_face("face-then", 0), _face("face-now", 0, image_sha256="e" * 64, run_id="r2")]
        ),
    )
    append_images(store, "r1", pa.Table.from_pylist([BEACH]))
    append_images(
        store, "r2", pa.Table.from_pylist([BEACH | {"image_sha256": "e" * 64, "run_id": "r2"}])
    )
    code, out, _ = run(capsys, "explain", uri, "--store", str(root))
    assert code == 0
    assert "later:     this path holds other bytes since run r2" in out
    now = out.index("faces of this content (1):")
    before = out.index("faces of other content this path held (aaaaaaaaaaaa..., 1):")
    assert now < out.index("face face-now") < before < out.index("face face-then")


def test_explain_of_a_moved_photo_s_old_path_says_where_it_went(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The old path of a moved photo read "no longer there ... `faceloop forget --image`
    removes them": following that advice would have taken the photo from its new place."""
    import pyarrow as pa

    from storage.objectstore import open_store
    from storage.tables import append_images

    root = tmp_path / "store"
    st = open_store(str(root))
    new = tmp_path / "photos" / "B" / "live1.jpg"
    new.parent.mkdir(parents=True)
    new.write_bytes(b"jpeg")
    old = str(tmp_path / "photos" / "A" / "live1.jpg")
    row = {"image_sha256": "c" * 64, "source_kind": "idcard", "role": "live", "status": "ok"}
    append_images(st, "r1", pa.Table.from_pylist([row | {"image_uri": old, "run_id": "r1"}]))
    moved = {"image_uri": str(new), "run_id": "r2", "reason_code": "moved"}
    append_images(st, "r2", pa.Table.from_pylist([row | moved]))
    code, out, _ = run(capsys, "explain", old, "--store", str(root))
    assert code == 0
    assert f"file:      moved to {new} (its faces went with it)" in out
    assert "forget --image" not in out
    # A face keeps the path its photo was decoded at: explaining the face says where it is now
    # (it showed only the old path).
    face = _face("face-m", 0, image_uri=old, image_sha256="c" * 64)
    write_group(st, "album", ALBUM, pa.Table.from_pylist([face]))
    code, out, _ = run(capsys, "explain", "face-m", "--store", str(root))
    assert code == 0 and f"moved to {new}" in out


def test_explain_of_a_file_rewritten_with_its_stamp_kept_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A photo rewritten in place with its size and mtime put back (which a refresh does not
    see: README, `refresh --rehash`): explain hashed the file and showed the path's recorded
    photo and faces as the file's, with no word that the file holds other bytes now."""
    import hashlib

    import pyarrow as pa

    from storage.objectstore import open_store
    from storage.tables import append_images

    root = tmp_path / "store"
    st = open_store(str(root))
    photo = tmp_path / "photos" / "A" / "p.jpg"
    photo.parent.mkdir(parents=True)
    photo.write_bytes(b"first photo")
    row = {
        "image_uri": str(photo),
        "image_sha256": hashlib.sha256(b"first photo").hexdigest(),
        "source_kind": "album",
        "status": "ok",
        "run_id": "r1",
    }
    append_images(st, "r1", pa.Table.from_pylist([row]))
    code, out, _ = run(capsys, "explain", str(photo), "--store", str(root))
    assert code == 0 and "bytes no refresh has recorded" not in out
    photo.write_bytes(b"other photo")  # same size
    code, out, _ = run(capsys, "explain", str(photo), "--store", str(root))
    assert code == 0
    assert "now:       the file holds bytes no refresh has recorded" in out
    assert "faceloop refresh --rehash" in out

    # A file quarantined by its size (its bytes never read: a placeholder digest), then taken
    # in once the limit was raised: explain said it held unrecorded bytes ("--rehash takes
    # them in", which changed nothing) and that the path "holds other bytes since".
    big = tmp_path / "photos" / "A" / "big.jpg"
    big.write_bytes(b"a big photo")
    held = {**row, "image_uri": str(big), "status": "quarantined", "reason": "too large"}
    append_images(st, "r2", pa.Table.from_pylist([{**held, "image_sha256": "size:11"}]))
    code, out, _ = run(capsys, "explain", str(big), "--store", str(root))
    assert code == 0 and "bytes no refresh has recorded" not in out
    read = {**row, "image_uri": str(big), "run_id": "r3"}
    read["image_sha256"] = hashlib.sha256(b"a big photo").hexdigest()
    append_images(st, "r3", pa.Table.from_pylist([read]))
    code, out, _ = run(capsys, "explain", str(big), "--store", str(root))
    assert code == 0 and "bytes no refresh has recorded" not in out
    assert "holds other bytes since" not in out


def test_explain_of_a_name_the_refresh_ignores_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`explain album/.DS_Store` said only "no face or image": a user looked for a bug."""
    from storage.objectstore import open_store

    root = tmp_path / "store"
    open_store(str(root)).write_bytes("state/x.json", b"{}")
    code, _, err = run(capsys, "explain", "/photos/A/.DS_Store", "--store", str(root))
    assert code == 1 and "limits.ignore" in err
    code, _, err = run(capsys, "explain", "/photos/A/p.jpg", "--store", str(root))
    assert code == 1 and "limits.ignore" not in err
    # The config's own limits.ignore, and the folders below a source's root (not above it).
    src = tmp_path / ".hidden" / "src"
    cfg = _yaml(
        tmp_path,
        f"store: {root}\nsources:\n  - {{kind: album, uri: '{src}'}}\n"
        "limits:\n  ignore: ['*.raw', '@eaDir']\n",
    )
    for target, said in (
        (f"{src}/A/x.raw", True),
        (f"{src}/A/@eaDir/p.jpg", True),
        (f"{src}/A/p.jpg", False),  # .hidden is above the source's root
        (f"{src}/A/.DS_Store", False),  # the defaults are not this config's
    ):
        code, _, err = run(capsys, "explain", target, "--config", cfg)
        assert code == 1 and ("limits.ignore" in err) == said, (target, err)


def test_explain_and_forget_of_a_symlink_loop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A symlink loop the refresh recorded (quarantined, unreadable): explain and forget
    --image --dry-run failed with "RuntimeError: Symlink loop from ..." (exit 1)."""
    import pyarrow as pa

    from storage.objectstore import open_store
    from storage.tables import append_images

    root = tmp_path / "store"
    st = open_store(str(root))
    a, b = tmp_path / "photos" / "A" / "loop_a.jpg", tmp_path / "photos" / "A" / "loop_b.jpg"
    a.parent.mkdir(parents=True)
    a.symlink_to(b)
    b.symlink_to(a)
    row = {
        "image_uri": str(a),
        "image_sha256": "unread:unreadable",
        "source_kind": "album",
        "status": "quarantined",
        "reason": "unreadable: stat: Too many levels of symbolic links",
        "run_id": "r1",
    }
    append_images(st, "r1", pa.Table.from_pylist([row]))
    code, out, err = run(capsys, "explain", str(a), "--store", str(root))
    assert code == 0 and "Too many levels of symbolic links" in out, err
    code, out, err = run(capsys, "forget", "--image", str(a), "--dry-run", "--store", str(root))
    assert code == 0 and "RuntimeError" not in err, err


def test_explain_an_image_and_an_older_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "store"
    _build_store(root)
    code, out, _ = run(capsys, "explain", "/photos/holiday/beach.jpg", "--store", str(root))
    assert code == 0
    assert "image /photos/holiday/beach.jpg" in out and "status:    ok" in out
    # The photo is gone from its source: status ok alone read as if it were still there.
    assert "file:      no longer there (its faces and labels stay" in out
    assert "640x480, 2 face(s), in album 'holiday'" in out  # it read "album in album"
    assert "faces of this content (2):" in out  # not indented under the last image row
    assert "face face-ok" in out and "face face-out" in out and "face-small" not in out
    assert "task cc-id-0001-r1" in out  # review of its faces

    code, out, _ = run(capsys, "explain", "d" * 64, "--store", str(root), "--json")
    got = json.loads(out)
    assert got["kind"] == "image" and got["images"] == []  # faces without an image record
    (small,) = got["faces"]
    assert small["face_id"] == "face-small" and small["status"] == "rejected"
    assert small["reason_code"] == "too_small"  # parsed from the reason of an older row
    assert got["review"] == []
    code, out, _ = run(capsys, "explain", "face-small", "--store", str(root))
    assert "reason:    too_small  (too_small: face 14 px < 20 px)" in out
    assert "review: none" in out


def test_explain_a_moved_image_on_s3_lists_the_faces_it_reuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An S3 URI is not read to hash it: explain matched faces on the URI only, so a moved or
    copied photo (whose faces stay under the original URI) said "2 face(s)" and listed none."""
    root = tmp_path / "store"
    store = _build_store(root)
    moved = "s3://raw/holiday/beach-renamed.jpg"
    append_images(
        store,
        "r3",
        pa.Table.from_pylist(
            [
                BEACH
                | {
                    "image_uri": moved,
                    "reason": "moved: same bytes as /photos/holiday/beach.jpg, no longer listed",
                    "reason_code": "moved",
                    "run_id": "r3",
                }
            ]
        ),
    )
    code, out, _ = run(capsys, "explain", moved, "--store", str(root), "--json")
    got = json.loads(out)
    assert code == 0 and [r["image_uri"] for r in got["images"]] == [moved]
    assert sorted(f["face_id"] for f in got["faces"]) == ["face-ok", "face-out"]


def test_explain_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    _build_store(root)
    code, _, err = run(capsys, "explain", "/photos/elsewhere.jpg", "--store", str(root))
    assert code == EXIT_FAILED
    assert err.startswith("faceloop: error: no face or image '/photos/elsewhere.jpg'")
    code, _, err = run(capsys, "explain", "x", "--store", str(tmp_path / "missing"))
    assert code == EXIT_FAILED and "no store at" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--source", "albun=/tmp"], "--source expects KIND=URI"),
        (["--config", "BAD"], "ray.actors: Input should be a valid integer"),
    ],
)
def test_refresh_refuses_bad_flags_before_any_flow_run(
    argv: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A usage error is refused before a Prefect server is started and a flow run created for
    it (it used to take a temporary server's start, ~4 s, and leave a failed flow run)."""
    import flows.refresh

    argv = [_yaml(tmp_path, "ray:\n  actors: two\n") if a == "BAD" else a for a in argv]

    def no_flow(**kwargs: object) -> None:
        raise AssertionError("the flow ran")

    monkeypatch.setattr(flows.refresh, "refresh_flow", no_flow)
    code, _, err = run(capsys, "refresh", "--store", str(tmp_path / "store"), *argv)
    assert code == EXIT_USAGE and message in err and "the flow ran" not in err


def test_a_missing_source_fails_before_any_flow_run_or_store_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mistyped source folder failed inside the flow run, after the store lock had made an
    empty store folder: one clear error now (exit 1), no flow run, nothing made."""
    import flows.refresh

    def no_flow(**kwargs: object) -> None:
        raise AssertionError("the flow ran")

    monkeypatch.setattr(flows.refresh, "refresh_flow", no_flow)
    store = tmp_path / "store"
    code, _, err = run(
        capsys, "refresh", "--store", str(store), "--source", f"album={tmp_path}/albmus"
    )
    assert code == EXIT_FAILED and f"source {tmp_path}/albmus does not exist" in err, err
    assert not store.exists()


@pytest.mark.parametrize(
    ("store", "sources", "message"),
    [
        (
            "S/store",
            ["album=S/data", "idcard=S/data/ids"],
            "source album=S/data and source idcard=S/data/ids overlap",
        ),
        ("S/data/store", ["album=S/data"], "the store's own files would be listed as images"),
        ("S/in", ["album=S/in/albums"], "a store holds faceloop's files only"),
        ("s3://b/x", ["album=s3://b/x/in"], "source album=s3://b/x/in and store s3://b/x overlap"),
    ],
)
def test_sources_and_the_store_that_overlap_are_refused(
    store: str,
    sources: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ID-card folder inside an album source had every ID and live photo quarantined as an
    album file in the wrong layout (the album listing came first, the ID-card one found them
    seen); a store inside a source would be listed as images. Both are refused, with both
    places named."""
    import flows.refresh

    def no_flow(**kwargs: object) -> None:
        raise AssertionError("the flow ran")

    monkeypatch.setattr(flows.refresh, "refresh_flow", no_flow)
    argv = ["--store", store.replace("S", str(tmp_path))]
    for s in sources:
        argv += ["--source", s.replace("S", str(tmp_path))]
    code, _, err = run(capsys, "refresh", *argv)
    assert code == EXIT_USAGE and message.replace("S", str(tmp_path)) in err, err
    # Siblings, and names that only share a prefix, are fine.
    from faceloop.config import SourceSpec

    load_settings(
        None,
        store=str(tmp_path / "data-store"),
        sources=[
            SourceSpec(kind="album", uri=str(tmp_path / "data")),
            SourceSpec(kind="idcard", uri=str(tmp_path / "data2")),
        ],
    )


def test_a_file_uri_is_the_folder_it_names(tmp_path: Path) -> None:
    """`--source album=file:///abs` was refused ("names no bucket or host") while
    `file://localhost/abs` was taken, and then every photo quarantined as wrong_layout."""
    for uri in (f"file://{tmp_path}", f"file://localhost{tmp_path}/", f"FILE://{tmp_path}"):
        s = load_settings(
            None, store=f"{uri}/st", sources=[SourceSpec(kind="album", uri=f"{uri}/in")]
        )
        assert (s.store, s.sources[0].uri) == (str(tmp_path / "st"), str(tmp_path / "in"))
    with pytest.raises(ConfigError, match="names a folder of this machine"):
        load_settings(None, store="file://nas/share/st")


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--store", "", "--source", "album=S/in"], {}, "argument --store: is empty"),
        (["--store", "  ", "--source", "album=S/in"], {}, "argument --store: is empty"),
        (["--source", "album=S/in"], {"FACELOOP_STORE": ""}, "the store is empty"),
        (["--store", "s3://", "--source", "album=S/in"], {}, "names no bucket or host"),
        (["--store", "S/st", "--source", "album=s3:///in"], {}, "names no bucket or host"),
        (["--store", "S/st", "--source", "album=S/in"], {"FACELOOP_MODELS__ROOT": ""}, "empty"),
        # One slash: a local folder "s3:" under the working directory got the whole store.
        (["--store", "s3:/team/x", "--source", "album=S/in"], {}, "is not a folder or an s3://"),
        (["--store", "S/st", "--source", "album=gs://b/in"], {}, "gs: is not read as a scheme"),
    ],
)
def test_an_empty_store_source_or_models_folder_is_refused(
    argv: list[str],
    env: dict[str, str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--store ""` (an unset variable in a script) wrote a store's tables, state, runs and
    reports into the working directory; an empty models.root filled it with model files."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "refresh", *(a.replace("S", str(tmp_path)) for a in argv))
    assert code == EXIT_USAGE and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing written where it ran"


@pytest.mark.parametrize(
    "argv",
    [
        ["forget", "--store", "", "--identity", "x", "--yes"],
        ["forget", "--store", "S", "--subject", "", "--yes"],
        ["forget", "--store", "S", "--image", " ", "--yes"],
        ["datasets", "gc", "--store", ""],
        ["doctor", "--store", ""],
        ["explain", "", "--store", "S"],
        ["train", "--store", "S", "--dataset", "faces", "--out", ""],
        ["refresh", "--config", ""],
    ],
)
def test_an_empty_name_or_place_is_refused_not_read_as_not_given(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--store ""` fell back to the config's store (forget, gc, doctor, explain): a script
    whose variable was unset worked on another store than it meant; `--subject ""` was
    tombstoned."""
    code, _, err = run(capsys, *(a.replace("S", str(tmp_path)) for a in argv))
    assert code == EXIT_USAGE and ": is empty" in err, err


def test_sigterm_unwinds_a_command_like_ctrl_c(tmp_path):
    """SIGTERM (a scheduler's stop, `timeout`) runs the command's `finally` blocks: a bench
    killed that way used to leave its Prefect server (own session) and its child jobs running."""
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import pathlib, time
import faceloop.commands.doctor as doctor
from faceloop.cli import main

def slow(args):
    try:
        pathlib.Path({str(tmp_path)!r}, "started").write_text("x")
        time.sleep(60)
    finally:
        pathlib.Path({str(tmp_path)!r}, "cleaned up").write_text("x")

doctor.cmd_doctor = slow
raise SystemExit(main(["doctor", "--store", {str(tmp_path / "store")!r}]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert (tmp_path / "cleaned up").exists(), err
    assert proc.returncode == 128 + signal.SIGTERM, err


def test_an_interrupted_command_ends_its_process_once_cleaned_up(tmp_path):
    """Ctrl-C during the face stage aborted the process at interpreter shutdown (exit 134, 139:
    onnxruntime's and Ray's native threads still unwinding) after the run had cleaned up; the
    program ends itself with 130 / 143 once its command returned. Here a thread that would
    outlive the command stands for them (Python would wait 60 s for it). A temporary Prefect
    server it started is stopped before the process ends (it outlived a stopped refresh)."""
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import pathlib, signal, sys, threading, time
import faceloop.commands.doctor as doctor
from faceloop.cli import main

# As in a terminal: a job started in the background (nohup ... &) inherits SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)

def slow(args):
    threading.Thread(target=time.sleep, args=(60,)).start()  # not a daemon
    # A temporary Prefect server (as a refresh starts one): Prefect stops it at exit.
    import subprocess
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer(port=1)
    server.server_process, server.running = subprocess.Popen(["sleep", "60"]), True
    pathlib.Path({str(tmp_path)!r}, "server").write_text(str(server.server_process.pid))
    pathlib.Path({str(tmp_path)!r}, "started").write_text("x")
    time.sleep(60)

doctor.cmd_doctor = slow
sys.argv = ["faceloop", "doctor", "--store", {str(tmp_path / "store")!r}]
raise SystemExit(main())
"""
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        (tmp_path / "started").unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not (tmp_path / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        t0 = time.monotonic()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=40)
        assert proc.returncode == code and time.monotonic() - t0 < 20, err
        # ... and so is the temporary server (os._exit skipped Prefect's atexit stop).
        with pytest.raises(ProcessLookupError):
            os.kill(int((tmp_path / "server").read_text()), 0)


def test_a_sigterm_in_a_flow_run_exits_143(monkeypatch, capsys) -> None:
    """Prefect ends a flow run stopped by SIGTERM with SystemExit(15): the refresh exited 15,
    not 128 + 15 like every other command a scheduler stops."""
    import faceloop.commands.doctor as doctor

    def stopped(args):
        raise SystemExit(15)

    monkeypatch.setattr(doctor, "cmd_doctor", stopped)
    code, _, err = run(capsys, "doctor", "--store", "/nonexistent")
    assert code == 143 and "terminated" in err


@pytest.mark.parametrize("flag", ["--images", "--rounds", "--increments", "--repeat"])
def test_bench_counts_of_zero_are_refused_not_replaced(flag, capsys):
    """`faceloop bench --images 0` used to run the default 1,000 images (0 read as "not given")."""
    from faceloop.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", flag, "0"])
    assert exit_.value.code == 2
    assert f"argument {flag}: must be 1 or more, not 0" in capsys.readouterr().err


def test_train_takes_a_dataset_version_as_datasets_show_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --version v2` was an argparse error and `--version -1` looked for
    datasets/faces/v-1: the same N, vN or latest as `datasets show`, N >= 1."""
    from faceloop.cli import build_parser

    base = ["train", "--store", str(tmp_path), "--dataset", "faces", "--out", str(tmp_path / "o")]
    parse = build_parser().parse_args
    assert parse([*base, "--version", "v2"]).version == 2
    assert parse([*base, "--version", "3"]).version == 3
    assert parse(base).version == "latest"
    for bad in ("0", "-1", "v0", "latest2"):
        code, _, err = run(capsys, *base, "--version", bad)
        assert code == EXIT_USAGE and "version must be N, vN (N >= 1) or latest" in err, err


def test_train_checks_its_settings_before_the_first_epoch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --device bogus` was a RuntimeError traceback (exit 1) after the dataset was read,
    `--device cuda` on a CPU build an AssertionError; `--config` with a typo was never read
    unless --register or --on-top came with it; `--base` without --on-top had no prefix."""
    base = ["train", "--store", str(tmp_path), "--dataset", "faces", "--out", str(tmp_path / "o")]
    code, _, err = run(capsys, *base, "--device", "bogus")
    assert code == EXIT_USAGE and "device 'bogus': expected auto, cpu, cuda or cuda:N" in err
    import torch

    if not torch.cuda.is_available():
        code, _, err = run(capsys, *base, "--device", "cuda:0")
        assert code == EXIT_USAGE and "sees no CUDA device" in err, err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("modles: {root: /x}\n")
    code, _, err = run(capsys, *base, "--config", str(cfg))
    assert code == EXIT_USAGE and "modles" in err, err
    code, _, err = run(capsys, *base, "--base", str(tmp_path / "b.onnx"))
    assert code == EXIT_USAGE and err.startswith("faceloop: error: --base needs --on-top"), err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["calibrate", "eval", "loop-eval"])
def test_a_labelled_folder_missing_or_without_recurring_people_is_a_usage_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing folder was a FileNotFoundError (exit 1, "-v shows the traceback"); an empty one
    made calibrate fail in numpy ("cannot reshape array of size 0")."""
    (tmp_path / "lab" / "one_person").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "lab" / "one_person" / "a.jpg")
    out = ["--out", str(tmp_path / "out.yaml" if command == "calibrate" else tmp_path / "out")]
    code, _, err = run(capsys, command, "--labelled", str(tmp_path / "nope"), *out)
    assert code == EXIT_USAGE and "labelled folder not found" in err, err
    code, _, err = run(capsys, command, "--labelled", str(tmp_path / "lab"), *out)
    assert code == EXIT_USAGE and "people with >= 2 images" in err, err


@pytest.mark.parametrize(
    "env",
    [
        {"FACELOOP_RAY__ACTORS": "0"},
        {"FACELOOP_RAY__BATCH_SIZE": "0"},
        {"FACELOOP_MODELS__DET_SIZE": "0"},
        {"FACELOOP_MODELS__DET_THRESH": "2"},
        {"FACELOOP_MODELS__EMBED_BATCH": "0"},
        {"FACELOOP_DATASET__JPEG_QUALITY": "500"},
        {"FACELOOP_DATASET__SHARD_ROWS": "0"},
        {"FACELOOP_CLUSTER__MIN_CLUSTER_SIZE": "1"},
        {"FACELOOP_QUALITY__MIN_QUALITY": "1.5"},
        {"FACELOOP_LOCK__LEASE_SECONDS": "0"},
        {"FACELOOP_LOCK__WAIT_SECONDS": "-5"},
        {"FACELOOP_REVIEW__BATCH_SIZE": "0"},
        {"FACELOOP_LIMITS__MAX_IMAGE_BYTES": "0"},
        {"FACELOOP_RETENTION__REPORTS_DAYS": "-1"},
    ],
)
def test_numbers_out_of_their_range_are_refused_by_name(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every number in the settings was taken as given: det_size 0 crashed the detector,
    det_thresh 2 found no face ever, lease_seconds 0 spun the lock's heartbeat, min_cluster_size
    1 failed inside HDBSCAN."""
    ((name, value),) = env.items()
    monkeypatch.setenv(name, value)
    code, _, err = run(capsys, "config", "show")
    dotted = name.removeprefix("FACELOOP_").lower().replace("__", ".")
    assert code == EXIT_USAGE and f"invalid configuration: {dotted}: " in err, err


def test_a_threshold_that_is_no_cosine_or_a_review_band_above_accept_is_refused(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "p.yaml"
    cfg.write_text("policy:\n  edgeface_s_gamma_05: {idcard_accept: 47}\n")  # meant 0.47
    with pytest.raises(ConfigError, match=r"idcard_accept: 47.0 is no cosine similarity"):
        load_settings(cfg)
    cfg.write_text("policy:\n  edgeface_s_gamma_05: {idcard_review: 0.5}\n")
    with pytest.raises(ConfigError, match=r"idcard_review 0\.5 is above idcard_accept 0\.468"):
        load_settings(cfg)
    cfg.write_text("policy:\n  edgeface_s_gamma_05: {idcard_review: 0.3}\n")  # inside: fine
    assert load_settings(cfg).policy["edgeface_s_gamma_05"].idcard_review == 0.3


def test_extensions_in_any_spelling_mean_the_lower_case_suffix(tmp_path: Path) -> None:
    """`extensions: [JPG, .PNG]` quarantined every photo as unsupported_extension (discovery
    compares lower-case '.ext' suffixes); an empty list did the same, silently."""
    cfg = tmp_path / "x.yaml"
    cfg.write_text("limits:\n  extensions: [JPG, .PNG, ' heic ', .jpg]\n")
    assert load_settings(cfg).limits.extensions == [".jpg", ".png", ".heic"]
    for bad, says in [
        ("[]", "no extension"),
        ("[tar.gz]", "one suffix"),
        ("['.']", "one suffix"),
        ("['']", "one suffix"),
        # formats the decoder reads none of: every file would be quarantined, silently
        ("[jpg, gif, tif]", "decodes no .gif file"),
        ("[.CR2]", "decodes no .cr2 file"),
    ]:
        cfg.write_text(f"limits:\n  extensions: {bad}\n")
        with pytest.raises(ConfigError, match=rf"limits\.extensions: .*{says}"):
            load_settings(cfg)


def test_a_prefect_api_url_that_answers_nothing_is_named_with_what_to_do(tmp_path: Path) -> None:
    """PREFECT_API_URL left pointing at a stopped server: 'RuntimeError: Failed to reach API'
    with a hint to use -v; now what to do about it."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    (tmp_path / "in").mkdir()
    # its own process: Prefect reads its settings once per process
    argv = ["refresh", "--store", str(tmp_path / "st"), "--source", f"album={tmp_path}/in"]
    done = subprocess.run(
        [sys.executable, "-m", "faceloop.cli", *argv],
        env={**os.environ, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = done.stderr
    assert done.returncode == EXIT_FAILED and "Failed to reach API" in err, err
    assert "prefect server start" in err and "unset PREFECT_API_URL" in err
    assert not (tmp_path / "st").exists()


def test_a_prefect_api_that_takes_connections_and_never_answers_is_named_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """PREFECT_API_URL naming a server that accepts connections but never answers (hung): the
    refresh was silent for ~7 minutes, then said "Failed to reach API ... start that server".
    Now its /health gets PREFECT_API_ANSWER_S seconds; a server that answers passes at once."""
    import http.server
    import socket
    import threading
    import time

    from faceloop import localnet

    monkeypatch.setattr(localnet, "PREFECT_API_ANSWER_S", 0.5)
    (tmp_path / "in").mkdir()
    argv = ["refresh", "--store", str(tmp_path / "st"), "--source", f"album={tmp_path}/in"]
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel takes the connection; nothing ever reads or answers it
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/api"
        monkeypatch.setenv("PREFECT_API_URL", url)
        t0 = time.monotonic()
        code, _, err = run(capsys, *argv)
    assert code == EXIT_FAILED and time.monotonic() - t0 < 5, err
    assert f"Prefect API at {url} accepted the connection but did not answer within 0.5 s" in err
    assert "unset PREFECT_API_URL" in err and "Failed to reach API" not in err
    assert not (tmp_path / "st").exists()

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            localnet.check_prefect_api(f"http://127.0.0.1:{server.server_address[1]}/api")
            localnet.check_prefect_api(f"http://127.0.0.1:{server.server_address[1]}/x")  # 404
        finally:
            server.shutdown()


@pytest.mark.parametrize(
    "argv",
    [
        ["forget", "--identity", "someone", "--yes"],
        ["review", "push", "--data-dir", "D"],
        ["review", "pull", "--data-dir", "D"],
        ["doctor"],
        ["explain", "x"],
    ],
)
def test_a_store_path_that_holds_no_store_is_refused(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """forget on a mistyped --store wrote tombstones into a new folder ('tombstoned anyway')
    while the person stayed in the real store; doctor passed every check on nothing."""
    typo = tmp_path / "stroe"
    args = [a.replace("D", str(tmp_path / "ls")) for a in argv]
    code, _, err = run(capsys, *args, "--store", str(typo))
    assert code == EXIT_FAILED and f"no store at {typo}" in err, err
    assert not typo.exists(), "nothing written at the mistyped path"


def test_prefect_temporary_servers_left_by_killed_runs_are_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh killed with SIGKILL left its Prefect temporary server running for good (six
    piled up in an afternoon). The next refresh stops those that init adopted; a live run's
    server (its parent alive), a user's own `prefect server start` and other programs are left
    alone."""
    import os
    import signal

    from faceloop import localnet

    marker = b"python\0-m\0uvicorn\0--factory\0prefect.server.api.server:create_app\0"

    def proc(pid: int, cmdline: bytes, ppid: int, env: list[bytes]) -> None:
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes(cmdline)
        (d / "stat").write_text(f"{pid} (python3 x) S {ppid} {pid} 0 0")
        (d / "environ").write_bytes(b"\0".join(env) + b"\0")

    temp = [b"HOME=/root", b"PREFECT__SERVER_EPHEMERAL=1"]
    proc(101, marker, 1, temp)  # orphaned temporary server: stopped
    proc(102, marker, 4242, temp)  # a live refresh's: its parent is alive
    proc(103, marker, 1, [b"HOME=/root"])  # `prefect server start` a user runs: not ephemeral
    proc(104, b"sleep\0300\0", 1, temp)  # something else
    (tmp_path / "self").mkdir()
    killed: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    assert localnet.stop_orphaned_prefect_servers(str(tmp_path)) == [101]
    assert killed == [(101, signal.SIGTERM)]
    assert localnet.stop_orphaned_prefect_servers(str(tmp_path / "none")) == []


def test_review_pull_prints_counts_not_task_keys() -> None:
    """`faceloop review pull` printed every settled task key at every level (an ID pair's key
    holds the subject id, e.g. idcard_pair:Jane_Doe_1980:<face ids>) to terminals, cron mails
    and CI logs."""
    from faceloop.commands.review import _counts_only

    key = "idcard_pair:Jane_Doe_1980:452aea172259b35dcf92:c6fe18b1f2f7c18db2ed"
    out = _counts_only(
        {
            "new_answers": 1,
            "report": {"settled": {key: 2}, "applied": 1},
            "settled_per_answer": {key: 2, "cc:id-1:r1": 3, "cc:id-2:r1": 0},
            "propagated": {"cc:id-1:r1": 1},
        }
    )
    assert "Jane_Doe" not in json.dumps(out)
    # (Propagated faces are in "faces", and said apart: a probe read them as answered ones.
    # An answer applied again that settled nothing this time is not counted: every pull
    # printed every recorded answer as settled.)
    assert out["settled"] == {"answers": 2, "faces": 5, "propagated": 1}
    assert out["report"]["settled"] == 2


def test_explain_says_what_an_answer_was_when_it_was_not_understood_or_won_a_conflict() -> None:
    """An answer with no choice the task asks for printed "answer by ...: " with nothing after
    it, and an answer applied under conflict_rule latest was listed as "held as a conflict"."""
    from faceloop.commands.explain import _review_lines

    task = {
        "task": "cluster_check:x",
        "kind": "cluster_check",
        "project_id": 1,
        "task_id": 4,
        "pushed_at": "t0",
        "proposal": "all_belong",
        "score": 0.5,
        "answers": [
            {
                "annotator": "a",
                "updated_at": "t1",
                "decision": "",
                "marked": [],
                "cancelled": False,
            },
            {
                "annotator": "b",
                "updated_at": "t2",
                "decision": "all_belong",
                "marked": [],
                "cancelled": False,
            },
        ],
        "applied": [
            {
                "conflict": True,
                "decision": "all_belong",
                "run_id": "r",
                "applied_at": "t3",
                "settled": 4,
            },
            {"conflict": True, "decision": None, "run_id": "r", "applied_at": "t4", "settled": 0},
        ],
    }
    text = "\n".join(_review_lines([task]))
    assert "answer by a at t1: not understood" in text
    assert "applied all_belong (the latest of conflicting answers) in run r" in text
    assert "held as a conflict in run r at t4" in text


def test_the_temporary_prefect_server_starts_in_a_session_of_its_own(monkeypatch) -> None:
    """A Ctrl-C in the terminal signals the whole foreground process group: the temporary
    Prefect server died with the refresh, and Prefect's exit handlers then spent ~70 s retrying
    to reach it ("Error logging to API") before the command exited. Its Popen now starts the
    server in a new session (the rest of ``subprocess`` is the real one)."""
    import subprocess
    import sys

    from prefect.server.api import server

    from faceloop import localnet

    monkeypatch.setattr(server, "subprocess", subprocess)
    localnet.detach_temporary_prefect_server()
    localnet.detach_temporary_prefect_server()  # once is enough: not wrapped twice
    shim = server.subprocess
    assert isinstance(shim, localnet._DetachedSubprocess)
    assert shim.TimeoutExpired is subprocess.TimeoutExpired
    child = shim.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert os.getsid(child.pid) == child.pid != os.getsid(0)
    finally:
        child.kill()
        child.wait()


def test_a_refresh_of_a_held_store_is_refused_before_its_flow_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second refresh on a store another one holds (lock.wait_seconds 0) exited 3 only after
    it had started a temporary Prefect server and a flow run (about 13 s)."""
    import flows.refresh
    from storage.lock import store_lock

    started: list[object] = []
    monkeypatch.setattr(flows.refresh, "refresh_flow", lambda **kw: started.append(kw))
    (tmp_path / "albums").mkdir()
    store = open_store(str(tmp_path / "store"))
    store.write_bytes("state/.keep", b"")
    with store_lock(store, "r-first", "refresh"):
        code, _, err = run(
            capsys,
            "refresh",
            "--store",
            str(tmp_path / "store"),
            "--source",
            f"album={tmp_path / 'albums'}",
        )
    assert code == 3 and "is locked by refresh run r-first" in err, err
    # A container probe: a pod's refresh refused by a dead pod's lock was not told that it is
    # taken over once the lease runs out.
    assert "taken over once its lease of 60 s runs out" in err
    assert "FACELOOP_LOCK__WAIT_SECONDS" in err
    assert not started


def test_explain_does_not_call_a_fifo_or_a_dangling_link_gone(tmp_path: Path) -> None:
    """A quarantined FIFO, folder link or dangling link read "no longer there" while it was."""
    import os

    from faceloop.commands.explain import _on_disk

    fifo, link, gone = tmp_path / "f.jpg", tmp_path / "l.jpg", tmp_path / "g.jpg"
    os.mkfifo(fifo)
    link.symlink_to(tmp_path / "nowhere.jpg")
    assert _on_disk(str(fifo)) and _on_disk(str(link)) and _on_disk(str(tmp_path))
    assert _on_disk(str(gone)) is False and _on_disk("s3://b/k.jpg") is None


def test_demo_refuses_a_folder_of_someone_elses_photos(tmp_path: Path, capsys) -> None:
    """`faceloop demo --config <a user's config> --fresh` deleted the album source's parent
    folder (the user's photos) and the store; without --fresh it wrote sample photos there."""
    import yaml

    photos = tmp_path / "photos"
    (photos / "albums" / "trip").mkdir(parents=True)
    (photos / "albums" / "trip" / "a.jpg").write_bytes(b"mine")
    (tmp_path / "store").mkdir()
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "store": str(tmp_path / "store"),
                "sources": [{"kind": "album", "uri": str(photos / "albums")}],
            }
        )
    )
    code, _, err = run(capsys, "demo", "--config", str(cfg), "--fresh")
    assert code == 1 and "holds files the demo did not make" in err
    assert (photos / "albums" / "trip" / "a.jpg").read_bytes() == b"mine"
    assert (tmp_path / "store").is_dir()


def test_demo_with_no_album_source_is_a_config_error(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("")
    code, _, err = run(capsys, "demo", "--config", str(cfg))
    assert code == EXIT_USAGE and "names no album source" in err


def test_demo_refuses_a_store_it_did_not_make(tmp_path: Path, capsys, monkeypatch) -> None:
    """`FACELOOP_STORE=<a team's store> faceloop demo --fresh` (demo.yaml says the variable
    overrides its store) deleted that store and rebuilt it with the demo's photos; without
    --fresh it labelled the sample photos into it."""
    import yaml

    demo = tmp_path / "var" / "demo"
    (demo / "input").mkdir(parents=True)
    (demo / "input" / "truth.json").write_text("{}")  # a sample input the demo made
    real = tmp_path / "teamstore"
    (real / "tables").mkdir(parents=True)
    (real / "tables" / "x").write_bytes(b"labels")
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "store": str(demo / "store"),
                "sources": [{"kind": "album", "uri": str(demo / "input" / "albums")}],
            }
        )
    )
    monkeypatch.setenv("FACELOOP_STORE", str(real))
    for extra in ([], ["--fresh"]):
        code, _, err = run(capsys, "demo", "--config", str(cfg), *extra)
        assert code == 1 and "was not made by the demo" in err
        assert (real / "tables" / "x").read_bytes() == b"labels"
    # `make demo` on a fresh clone: `review up` gave the demo's store its id before the demo
    # made its sample input. That store is the demo's (it was refused).
    monkeypatch.delenv("FACELOOP_STORE")
    shutil.rmtree(demo / "input")
    (demo / "store" / "state").mkdir(parents=True)
    (demo / "store" / "state" / "store_id").write_text("ab12")
    import faceloop.modelstore as modelstore

    def reached(*_a: object, **_k: object) -> None:
        raise SystemExit(99)  # past the store check, where the models are fetched

    monkeypatch.setattr(modelstore, "fetch_models", reached)
    code, _, err = run(capsys, "demo", "--config", str(cfg))
    assert code == 99 and "was not made by the demo" not in err


def test_explain_of_a_face_whose_photo_was_swapped_with_another_says_where_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two photos swapped names: explaining a face showed the path it was decoded at, which now
    holds the other photo; a user who went there to check or delete it had the wrong one."""
    import pyarrow as pa

    from storage.objectstore import open_store

    root = tmp_path / "store"
    st = open_store(str(root))
    a, b = tmp_path / "photos" / "a.jpg", tmp_path / "photos" / "b.jpg"
    a.parent.mkdir()
    a.write_bytes(b"y")
    b.write_bytes(b"x")
    x, y = "e" * 64, "f" * 64

    def row(uri: Path, sha: str, run: str) -> dict:
        return {"image_uri": str(uri), "image_sha256": sha, "status": "ok", "run_id": run}

    append_images(st, "r1", pa.Table.from_pylist([row(a, x, "r1"), row(b, y, "r1")]))
    append_images(st, "r2", pa.Table.from_pylist([row(a, y, "r2"), row(b, x, "r2")]))
    write_group(
        st,
        "album",
        ALBUM,
        pa.Table.from_pylist([_face("face-s", 0, image_uri=str(a), image_sha256=x)]),
    )
    code, out, _ = run(capsys, "explain", "face-s", "--store", str(root))
    assert code == 0
    assert f"this path holds other bytes since run r2; this photo is at {b} now" in out


def test_a_store_faceloop_may_not_read_says_what_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store chown'ed to another user: doctor, datasets list and refresh printed the generic
    'PermissionError: [Errno 13] ... (-v shows the traceback)'."""
    import faceloop.commands.doctor as doctor

    (tmp_path / "store").mkdir()

    def denied(*_: object) -> list:
        raise PermissionError(13, "Permission denied", str(tmp_path / "store" / "tables"))

    monkeypatch.setattr(doctor, "run_checks", denied)
    code, _, err = run(capsys, "doctor", "--store", str(tmp_path / "store"))
    assert code == 1
    assert err.startswith(f"faceloop: error: permission denied: {tmp_path}/store/tables: ")
    assert "owner and mode" in err


def test_explain_prints_names_as_text_never_as_terminal_controls():
    """A security probe: a file named ``p\\n  status:    ok\\x1b[8m.jpg`` printed a forged
    "status: ok" line, and ESC[8m hid the real status after it on a terminal."""
    from faceloop.commands import shown
    from faceloop.commands.explain import render

    name = "/in/albums/hol\u202eiday/p\n  status:    ok\x1b[8m.jpg"
    image = {
        "image_uri": name,
        "image_sha256": "ab" * 32,
        "status": "quarantined",
        "reason": "not_an_image: cannot identify image file",
        "width": None,
        "height": None,
        "n_faces": 0,
        "role": "album",
        "source_kind": "album",
        "source_group": "hol\u202eiday\x1b[2K",
        "run_id": "r1",
    }
    text = render({"kind": "image", "images": [image], "faces": [], "review": []})
    assert "\x1b" not in text and "\u202e" not in text
    lines = text.splitlines()
    assert [ln for ln in lines if ln.lstrip().startswith("status:")] == [
        "  status:    quarantined, not_an_image: cannot identify image file"
    ]
    assert lines[0] == "image /in/albums/hol\\u202eiday/p\\n  status:    ok\\x1b[8m.jpg"
    assert shown("Zoë/名前/a b.jpg") == "Zoë/名前/a b.jpg"  # printable names stay as they are


def test_a_refresh_whose_prefect_home_cannot_be_written_says_so_at_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A container probe with a read-only HOME: the temporary Prefect server died at start and
    the run printed four sqlite tracebacks, then "Timed out while attempting to connect to
    ephemeral Prefect API server" after ~25 s."""
    import time

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", "/dev/null/prefect")
    (tmp_path / "albums" / "a1").mkdir(parents=True)
    t0 = time.monotonic()
    code, _, err = run(
        capsys,
        "refresh",
        "--store",
        str(tmp_path / "store"),
        "--source",
        f"album={tmp_path / 'albums'}",
    )
    assert code == 1 and time.monotonic() - t0 < 10
    assert "Prefect's home /dev/null/prefect cannot be written" in err
    assert "set PREFECT_HOME to a writable folder, or PREFECT_API_URL" in err
    assert not (tmp_path / "store").exists()


def test_a_refresh_whose_prefect_home_is_on_a_full_file_system_says_so_at_once(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """PREFECT_HOME on a full file system passed the writable check (an empty file still fits):
    the temporary Prefect server died at start, and the run printed ~700 lines of sqlite
    tracebacks, then "Timed out while attempting to connect to ephemeral Prefect API server"."""
    import shutil

    from faceloop import localnet

    home = tmp_path / "prefect"
    real = shutil.disk_usage
    free = {"bytes": 2**20}

    def usage(path: str) -> object:
        total, used, _ = real(path)
        return type(real(path))(total, used, free["bytes"])

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setattr(shutil, "disk_usage", usage)
    (tmp_path / "albums" / "a1").mkdir(parents=True)
    argv = ["refresh", "--store", str(tmp_path / "store"), "--source", f"album={tmp_path}/albums"]
    code, _, err = run(capsys, *argv)
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"Prefect's home {home} has 1 MB free" in err
    assert f"needs {localnet.PREFECT_HOME_MIN_FREE // 2**20} MB there" in err
    assert "set PREFECT_HOME to a folder on one with room, or PREFECT_API_URL" in err
    assert not (tmp_path / "store").exists()
    free["bytes"] = localnet.PREFECT_HOME_MIN_FREE
    localnet.check_prefect_home()  # enough room: no word


def test_review_pull_and_push_with_review_off_say_so_and_succeed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A container probe: a cron's `review pull` with review off failed (exit 1, "no Label
    Studio token") while the scheduled review-pull deployment with the same settings skips."""
    monkeypatch.setenv("FACELOOP_REVIEW__ENABLED", "false")
    for verb in ("pull", "push"):
        code, out, _ = run(capsys, "review", verb, "--store", str(tmp_path / "store"))
        assert code == 0
        assert out.strip() == f"review is off (review.enabled: false): nothing to {verb}"


def test_refresh_imports_its_stages_before_the_flow_run_starts(tmp_path: Path) -> None:
    """A soak probe: SIGTERM landing inside a lazy `import cv2` of a running flow (Prefect
    raises it wherever the main thread is) left cv2 half-initialised ("partially initialized
    module 'cv2' has no attribute 'mat_wrapper'", exit 1) or deadlocked the import lock (the
    process hung). The stages' modules are imported before the flow run starts."""
    (tmp_path / "albums").mkdir()
    code = f"""
import sys
import flows.refresh
from faceloop.cli import main
def flow(**kw):
    print(sorted(m for m in ("cv2", "onnxruntime", "tasks.faces", "tasks.label", "tasks.publish")
                 if m in sys.modules))
    raise SystemExit(0)
flows.refresh.refresh_flow = flow
main(["refresh", "--store", {str(tmp_path / "store")!r}, "--source", "album={tmp_path / "albums"}"])
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"},
        timeout=120,
    )
    assert done.stdout.strip().splitlines()[-1] == str(
        ["cv2", "onnxruntime", "tasks.faces", "tasks.label", "tasks.publish"]
    ), done.stderr[-2000:]


def test_models_list_lists_what_is_there_and_says_what_is_not(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A new-machine probe: after a first `eval` (insightface and EdgeFace-S fetched), `models
    list` printed w600k, then stopped on the opencv backend not fetched (exit 1) before the
    recognizer in use, and printed licences as a Python dict."""
    from faceloop.modelstore import BUILTIN_RECOGNIZERS, builtin_recognizer_path, fetch_models

    fetch_models(tmp_path, ("insightface",))
    spec = BUILTIN_RECOGNIZERS["edgeface_s_gamma_05"]
    dest = builtin_recognizer_path(tmp_path, "edgeface_s_gamma_05")
    dest.parent.mkdir(parents=True)
    dest.write_bytes(b"")  # listed by presence (its sha256 is checked when loaded)
    code, out, _ = run(capsys, "models", "list", "--root", str(tmp_path))
    assert code == 0
    assert "scrfd_500m_bnkps.onnx" in out and "opencv       not fetched" in out
    assert f"built-in     recognizer {spec.file}" in out and "(in use: models.recognizer)" in out
    assert "licence: InsightFace pretrained model: non-commercial research use only" in out
    assert "{" not in out
    assert out.rstrip().endswith(
        f"`faceloop models fetch` copies the opencv models into {tmp_path}"
    )


def test_status_says_where_a_store_stands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Users reached for `faceloop status` to see a store's totals and found no such command
    (the totals were in the newest runs/<id>.json only)."""
    from tasks.summary import RunCounts, RunSummary, StoreTotals, write_run_record

    root = tmp_path / "store"
    store = _build_store(root)
    code, out, _ = run(capsys, "status", "--store", str(root))
    assert code == 0
    assert "runs:      none yet" in out and "lock:      free" in out
    for run_id, images in (
        ("20260101T000000000000Z-aaaaaa", 3),
        ("20260102T000000000000Z-bbbbbb", 5),
    ):
        write_run_record(
            store,
            RunSummary(
                run_id=run_id,
                store=str(root),
                totals=StoreTotals(images=images, faces=7),
                run=RunCounts(),
            ),
        )
    code, out, _ = run(capsys, "status", "--store", str(root), "--json")
    got = json.loads(out)
    assert got["runs"] == 2 and got["latest_run"]["run_id"].endswith("bbbbbb")
    assert got["latest_run"]["totals"]["images"] == 5 and got["lock"]["state"] == "free"
    code, out, _ = run(capsys, "status", "--store", str(root))
    assert "the latest 20260102T000000000000Z-bbbbbb" in out and "  images" in out
    assert "  quarantined (faces + images)  " in out  # as the refresh labels it
    code, _, err = run(capsys, "status", "--store", str(tmp_path / "none"))
    assert code == 1 and "no store at" in err


def test_status_shows_an_interrupted_run_as_the_latest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refresh killed after recording its images gets a record that says so (recovery), with
    no totals: `faceloop status` skipped it and named the run before it as the latest."""
    import pyarrow as pa

    from storage.recovery import record_interrupted_run
    from storage.tables import append_images
    from tasks.summary import RunCounts, RunSummary, StoreTotals, write_run_record

    root = tmp_path / "store"
    store = _build_store(root)
    finished, killed = "20260101T000000000000Z-aaaaaa", "20260102T000000000000Z-bbbbbb"
    image = {"image_uri": "/in/a.jpg", "image_sha256": "a" * 64, "status": "ok"}
    append_images(store, killed, pa.Table.from_pylist([image | {"run_id": killed}]))
    assert record_interrupted_run(store, killed, None)
    code, out, _ = run(capsys, "status", "--store", str(root), "--json")
    got = json.loads(out)["latest_run"]
    assert got["run_id"] == killed and got["interrupted"].startswith("stopped after recording")
    assert got["totals"] is None
    code, out, _ = run(capsys, "status", "--store", str(root))
    assert f"the latest {killed}\n           interrupted: stopped after recording" in out
    assert "totals:    none counted yet (no run has finished)" in out
    write_run_record(
        store,
        RunSummary(run_id=finished, store=str(root), totals=StoreTotals(images=3), run=RunCounts()),
    )
    code, out, _ = run(capsys, "status", "--store", str(root), "--json")
    got = json.loads(out)["latest_run"]
    assert got["run_id"] == killed and got["totals_of"] == finished
    assert got["totals"]["images"] == 3
    code, out, _ = run(capsys, "status", "--store", str(root))
    assert code == 0 and f"totals (as {finished}, the latest run that finished" in out


def test_calibrate_never_writes_over_its_config_or_an_existing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`calibrate --config mine.yaml --out mine.yaml` replaced the user's config with models and
    policy only (store, sources and review settings gone); any existing --out was replaced
    without a word."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"store: {tmp_path / 'store'}\n")
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    code, _, err = run(
        capsys, "calibrate", "--labelled", str(labelled), "--config", str(cfg), "--out", str(cfg)
    )
    assert code == EXIT_USAGE and "is the --config file" in err
    assert cfg.read_text() == f"store: {tmp_path / 'store'}\n"
    other = tmp_path / "calibrated.yaml"
    other.write_text("kept\n")
    code, _, err = run(capsys, "calibrate", "--labelled", str(labelled), "--out", str(other))
    assert code == EXIT_USAGE and "--force" in err and other.read_text() == "kept\n"


@pytest.mark.parametrize("n", ["0", "-3"])
def test_calibrate_takes_a_positive_max_people(n: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--max-people 0 meant "everyone" and -3 dropped three people, silently."""
    code, _, err = run(capsys, "calibrate", "--labelled", "x", "--out", "y", "--max-people", n)
    assert code == EXIT_USAGE and "--max-people" in err


def test_explain_of_a_file_whose_name_is_not_utf8(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`faceloop explain <its path>` failed with "UnicodeEncodeError: 'utf-8' codec can't encode
    character '\\udcff'", and given the \\xNN form discovery records, said the file was no
    longer there though it was."""
    import pyarrow as pa

    from storage.objectstore import open_store
    from storage.tables import append_images

    folder = tmp_path / "photos" / "A"
    folder.mkdir(parents=True)
    raw = os.fsencode(folder) + b"/bad\xff.jpg"
    with open(raw, "wb") as f:
        f.write(b"jpeg")
    escaped = str(folder) + "/bad\\xff.jpg"
    root = tmp_path / "store"
    st = open_store(str(root))
    row = {
        "image_uri": escaped,
        "image_sha256": "unread:non_utf8_name",
        "source_kind": "album",
        "status": "quarantined",
        "reason": "non_utf8_name: the file name is not valid UTF-8: rename it",
        "reason_code": "non_utf8_name",
        "run_id": "r1",
    }
    append_images(st, "r1", pa.Table.from_pylist([row]))
    for target in (os.fsdecode(raw), escaped):
        code, out, err = run(capsys, "explain", target, "--store", str(root))
        assert code == 0, err
        assert "non_utf8_name" in out and "no longer there" not in out


def test_ctrl_c_while_the_commands_load_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C during the first second or two (the commands' imports) printed a raw
    KeyboardInterrupt traceback instead of faceloop's one line."""

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, _, err = run(capsys, "status")
    assert code == 130 and err.strip() == "faceloop: error: interrupted"


def test_a_joined_ray_cluster_is_left_without_a_shutdown_at_a_stop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM while the cluster's head was dead: the exit path's ray.shutdown() hung ~20 s
    against it, then aborted the process (exit 134 instead of 143). A joined cluster has
    nothing in this process to stop; a private Ray still is stopped."""
    import types

    import faceloop.cli as cli
    import tasks.ray_faces as ray_faces

    calls: list[str] = []
    fake = types.SimpleNamespace(is_initialized=lambda: True, shutdown=lambda: calls.append("x"))
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(ray_faces, "_joined", {"address": "10.0.0.5:6379", "job": "01"})
    cli._stop_ray()
    assert calls == []
    monkeypatch.setattr(ray_faces, "_joined", {"address": None, "job": "01"})
    cli._stop_ray()
    assert calls == ["x"]
