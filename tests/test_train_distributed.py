"""Sharded training: the shipped accelerate configs reach the Trainer, and what CPU allows of FSDP.

On CPU, accelerate 1.15 sets up FSDP only for accelerator devices (GPU, XPU, NPU, ...): with
`use_cpu: true` it builds the FSDP plugin from the config, then trains with DDP (MULTI_CPU). What
is tested here: the config reaches the Trainer, the run says it is not sharded, finishes, and saves
a loadable model; and our gradient check under torch's own FSDP2 (which does run on CPU with gloo).
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from logitcache.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LOGITCACHE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}


def _launch_args(config: Path):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "logitcache", "train", "--no-progress"])
    _validate_launch_command(args)
    return args


def test_the_fsdp_example_reaches_accelerate_as_full_shard_fsdp2_over_8_gpus():
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = _launch_args(EXAMPLES / "fsdp.yaml")
    assert (args.use_fsdp, args.num_processes, args.module, args.training_script) == (True, 8, True, "logitcache")
    env = prepare_multi_gpu_env(args)  # what each process of `accelerate launch` gets
    assert {k: env[k] for k in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD",
                                "FSDP_AUTO_WRAP_POLICY", "FSDP_STATE_DICT_TYPE", "ACCELERATE_MIXED_PRECISION")} == {
        "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
        "ACCELERATE_MIXED_PRECISION": "bf16"}
    assert "FSDP_TRANSFORMER_CLS_TO_WRAP" not in env  # the student's own _no_split_modules


def test_the_deepspeed_example_is_zero3_over_8_gpus():
    args = _launch_args(EXAMPLES / "deepspeed_zero3.yaml")
    assert (args.use_deepspeed, args.zero_stage, args.num_processes, args.mixed_precision) == (True, 3, 8, "bf16")
    assert args.zero3_save_16bit_model is True  # the final model is one loadable state dict


def test_accelerate_launch_with_the_fsdp_example_on_cpu(tmp_path, built_cache, student):
    """The shipped config, changed only where CPU needs it, through the real `accelerate launch`."""
    config = yaml.safe_load((EXAMPLES / "fsdp.yaml").read_text())
    config.update(use_cpu=True, num_processes=2, mixed_precision="no", main_process_port=29541)
    cpu_config = tmp_path / "fsdp_cpu.yaml"
    cpu_config.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(cpu_config), "-m", "logitcache",
           "train", "--student", str(student), "--cache", str(built_cache), "--out", str(out), "--max-steps", "2",
           "--batch-size", "2", "--save-steps", "2", "--logging-steps", "1", "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-8000:]
    assert r.stderr.count("FSDP was asked for but accelerate set up MULTI_CPU") == 1  # rank 0 only
    result = json.loads((out / "logitcache_train_result.json").read_text())["result"]
    assert result["global_step"] == 2 and math.isfinite(result["train_loss"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert all(p.isfinite().all() for p in model.parameters())


_FSDP2_GRADIENT_CHECK = '''
import json, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
from logitcache.pipeline.student.train import first_non_finite_gradient

dist.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
ids = torch.arange(16).reshape(2, 8)
model(input_ids=ids, labels=ids).loss.backward()
found = [first_non_finite_gradient(model)]
if dist.get_rank() == 1:  # only rank 1's shard of one gradient goes bad
    model.model.layers[0].mlp.up_proj.weight.grad.to_local()[0, 0] = float("nan")
found.append(first_non_finite_gradient(model))
# One write per rank: print's separate newline lets the two ranks' lines run together on the shared pipe.
sys.stdout.write(json.dumps({"rank": dist.get_rank(), "found": found}) + "\\n")
sys.stdout.flush()
dist.destroy_process_group()
'''


def test_fsdp2_ranks_agree_on_a_non_finite_gradient_in_one_shard(tmp_path, student):
    """Each rank holds a shard of each gradient: a NaN in rank 1's must stop rank 0 too (else it waits)."""
    script = tmp_path / "check.py"
    script.write_text(_FSDP2_GRADIENT_CHECK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29542",
           str(script), str(student)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=ENV)
    assert r.returncode == 0, r.stderr[-5000:]
    lines = sorted((json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")), key=lambda d: d["rank"])
    assert [d["found"] for d in lines] == [[None, "model.layers.0.mlp.up_proj.weight"]] * 2


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_deepspeed_without_its_package_is_refused_in_one_line_before_any_work(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    r = CliRunner().invoke(app, ["train", "--student", "s", "--cache", "c", "--out", str(tmp_path / "run"),
                                 "--deepspeed", str(ds)])
    assert r.exit_code == 2 and r.output.strip() == "error: --deepspeed needs the deepspeed package: pip install deepspeed"
    assert not (tmp_path / "run").exists()


def test_fsdp_in_a_single_process_is_refused_in_one_line(tmp_path, built_cache, student):
    r = CliRunner().invoke(app, ["train", "--student", str(student), "--cache", str(built_cache),
                                 "--out", str(tmp_path / "run"), "--fsdp", "full_shard auto_wrap", "--no-progress"])
    assert r.exit_code == 2, r.output
    assert r.output.strip().startswith("error: --fsdp shards the model across processes: launch with `torchrun")
    assert len(r.output.strip().splitlines()) == 1


def test_an_fsdp_config_that_is_not_json_is_refused_in_one_line(tmp_path, built_cache, student):
    bad = tmp_path / "fsdp.json"
    bad.write_text("version: 2\n")  # YAML, not JSON
    r = CliRunner().invoke(app, ["train", "--student", str(student), "--cache", str(built_cache),
                                 "--out", str(tmp_path / "run"), "--fsdp", "full_shard", "--fsdp-config", str(bad)])
    assert r.exit_code == 2, r.output
    assert r.output.strip().startswith(f"error: --fsdp full_shard --fsdp-config {bad}: the Trainer refused it")
