"""The hub path end to end: `duplex serve`'s loading resolves repositories through huggingface_hub against a
local server speaking the hub's file protocol (HF_ENDPOINT), with HF_HOME in tmp: config.json names and
defaults, the 7B fallback, progress bars, the cache, offline mode, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import serve_hub

DEFAULT_NAMES = ("model.safetensors", "tokenizer-e351c8d8-checkpoint125.safetensors", "tokenizer_spm_32k_3.model")

LOAD = """
import argparse, json, sys
from duplex.bundle_args import add_model_arguments, load_models
parser = argparse.ArgumentParser()
add_model_arguments(parser)
bundle = load_models(parser.parse_args(sys.argv[1:]))
print(json.dumps({"name": bundle.model_name, "dim": bundle.lm.config.dim, "gen": bundle.lm_gen_defaults,
                  "lm": str(bundle.config.get("moshi_name")), "frame_size": bundle.frame_size}))
"""

RESOLVE_THEN_LOAD = """
import argparse, json, sys
from duplex.bundle import lm_config_of
from duplex.bundle_args import add_model_arguments, load_models, resolve_files
from duplex.model import LMConfig
parser = argparse.ArgumentParser()
add_model_arguments(parser)
files = resolve_files(parser.parse_args(["--device", "cpu"]))  # no file flags: the default repo
bundle = load_models(parser.parse_args(sys.argv[1:]))  # the same default names, with config overrides
print(json.dumps({"files": [files.lm_weights.name, files.mimi_weights.name, files.tokenizer.name],
                  "config": files.config, "is_7b": lm_config_of(files.config) == LMConfig.moshi_7b(),
                  "name": bundle.model_name, "dim": bundle.lm.config.dim}))
"""

# `duplex serve`'s own entry point, once per argv, in one process: its last stderr line and exit status.
SERVE_ERRORS = """
import contextlib, io, json, sys
from duplex.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["serve", "--device", "cpu", "--port", "0", *argv])
    results.append({"rc": rc, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run(code_or_cli: str | list[str], argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = code_or_cli if isinstance(code_or_cli, list) else [sys.executable, "-c", code_or_cli]
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=180, env=env)


def hub_env(hub_url: str, home: Path, offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def duplex_cli() -> list[str]:
    return [sys.executable, "-m", "duplex.cli"]


@pytest.fixture
def tiny_files(fixtures_dir, tiny_tokenizer_path) -> dict[str, bytes]:
    return {
        "lm": (fixtures_dir / "lm_tiny" / "model.safetensors").read_bytes(),
        "mimi": (fixtures_dir / "mimi_tiny" / "model.in_projs.safetensors").read_bytes(),
        "mimi_config": (fixtures_dir / "mimi_tiny" / "config.json").read_bytes(),
        "tokenizer": tiny_tokenizer_path.read_bytes(),
        "lm_config": (fixtures_dir / "lm_tiny" / "config.json").read_bytes(),
    }


def repo_with_config(tiny: dict[str, bytes], **changes) -> dict[str, bytes]:
    config = json.loads(tiny["lm_config"])
    config.update(moshi_name="weights/lm.safetensors", mimi_name="codec.safetensors", tokenizer_name="text.model",
                  mimi_config_name="codec.json", model_type="moshi", lm_gen_config={"temp": 0.5, "top_k_text": 7})
    config.update(changes)
    return {"config.json": json.dumps(config).encode(), "weights/lm.safetensors": tiny["lm"],
            "codec.safetensors": tiny["mimi"], "codec.json": tiny["mimi_config"], "text.model": tiny["tokenizer"]}


def test_repo_config_names_files_and_sampling_then_offline_from_cache(tiny_files, tmp_path):
    with serve_hub({"acme/tiny-moshi": repo_with_config(tiny_files)}) as hub:
        # huggingface_hub shows its tqdm bars on a terminal; TQDM_POSITION=-1 is its switch to show them on a pipe.
        online = run(LOAD, ["--hf-repo", "acme/tiny-moshi", "--device", "cpu"],
                     {**hub_env(hub.url, tmp_path), "TQDM_POSITION": "-1"})
        assert online.returncode == 0, online.stderr
        result = json.loads(online.stdout.splitlines()[-1])
        assert result["name"] == "acme/tiny-moshi" and result["dim"] == 64 and result["frame_size"] == 1920
        assert result["gen"]["temp"] == 0.5 and result["gen"]["top_k_text"] == 7 and result["gen"]["top_k"] == 250
        fetched = hub.requested("GET")
        assert sorted(fetched) == sorted(["config.json", "weights/lm.safetensors", "codec.safetensors",
                                          "codec.json", "text.model"])
        assert "100%" in online.stderr and "lm.safetensors" in online.stderr  # tqdm progress bars
        snapshot = tmp_path / "hub" / "models--acme--tiny-moshi" / "snapshots" / hub.commits["acme/tiny-moshi"]
        assert (snapshot / "weights" / "lm.safetensors").read_bytes() == tiny_files["lm"]

        seen = len(hub.requests)
        offline = run(LOAD, ["--hf-repo", "acme/tiny-moshi", "--device", "cpu"],
                      hub_env(hub.url, tmp_path, offline=True))
        assert offline.returncode == 0, offline.stderr
        assert json.loads(offline.stdout.splitlines()[-1]) == result
        assert len(hub.requests) == seen  # the server was not contacted


def test_repo_without_config_falls_back_to_the_7b_preset_and_default_names(tiny_files, tmp_path, fixtures_dir):
    repo = dict(zip(DEFAULT_NAMES, (tiny_files["lm"], tiny_files["mimi"], tiny_files["tokenizer"])))
    mimi_config = str(fixtures_dir / "mimi_tiny" / "config.json")
    with serve_hub({"kyutai/moshiko-pytorch-bf16": repo}) as hub:
        env = hub_env(hub.url, tmp_path)
        lm_config = str(fixtures_dir / "lm_tiny" / "config.json")
        done = run(RESOLVE_THEN_LOAD, ["--device", "cpu", "--config", lm_config, "--mimi-config", mimi_config], env)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.splitlines()[-1])
        # Without config.json: the default file names and the Moshi 7B preset.
        assert result["files"] == list(DEFAULT_NAMES) and result["config"] == {} and result["is_7b"]
        assert hub.requested("HEAD")[0] == "config.json" and "config.json" not in hub.requested("GET")
        assert sorted(hub.requested("GET")) == sorted(DEFAULT_NAMES)
        # The same default names with a small config override load end to end.
        assert result["name"] == "kyutai/moshiko-pytorch-bf16" and result["dim"] == 64

        # `duplex serve` itself: the tiny file under the default name is checked against the 7B preset and
        # refused in one line, from its header (the Mimi config flag makes the tiny codec load first).
        serve = run(duplex_cli(), ["serve", "--device", "cpu", "--mimi-config", mimi_config, "--port", "0"], env)
        assert serve.returncode == 1 and "Traceback" not in serve.stderr
        last = serve.stderr.strip().splitlines()[-1]
        assert last.startswith("duplex serve: Moshi LM weights: cannot load") and "does not match its config" in last
        assert "model (1024, 2816)" in last  # the 7B depth transformer's feed-forward


def test_missing_repo_file_or_family_is_one_clear_line(tiny_files, tmp_path):
    repos = {"acme/broken": repo_with_config(tiny_files, moshi_name="absent.safetensors"),
             "acme/family": repo_with_config(tiny_files, model_type="stt")}
    cases = [(["--hf-repo", "acme/nope"], "repository acme/nope not found on the Hugging Face Hub"),
             (["--hf-repo", "acme/broken"], "acme/broken has no file absent.safetensors"),
             (["--hf-repo", "acme/family"], "model_type 'stt' is not supported yet")]
    with serve_hub(repos) as hub:
        done = run(SERVE_ERRORS, [json.dumps([argv for argv, _ in cases])], hub_env(hub.url, tmp_path))
        assert done.returncode == 0, done.stderr  # no exception escaped duplex serve's main
        for (argv, expected), result in zip(cases, json.loads(done.stdout.splitlines()[-1])):
            lines = result["stderr"].strip().splitlines()  # INFO log lines, then the error
            assert result["rc"] == 1 and "Traceback" not in result["stderr"], (argv, result)
            assert lines[-1].startswith("duplex serve: ") and expected in lines[-1], (argv, lines)
            assert [line for line in lines if line.startswith("duplex serve: ")] == lines[-1:]
        family = [name for method, path in hub.requests if "acme/family" in path
                  for name in [path.rsplit("/", 1)[-1]] if method == "GET"]
        assert family == ["config.json"]  # refused before any weights were fetched


def test_offline_without_cache_is_one_clear_line(tmp_path):
    with serve_hub({}) as hub:
        done = run(SERVE_ERRORS, [json.dumps([[]])], hub_env(hub.url, tmp_path, offline=True))
        assert done.returncode == 0, done.stderr
        (result,) = json.loads(done.stdout.splitlines()[-1])
        assert result["rc"] == 1 and "offline mode is on" in result["stderr"].strip().splitlines()[-1]
        assert hub.requests == []
