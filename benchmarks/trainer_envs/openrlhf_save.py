"""Write a checkpoint series with OpenRLHF's own save path (run under torchrun, CPU, gloo).

    torchrun --standalone --nproc_per_node 2 openrlhf_save.py --base BASE --ckpt CKPT --stubs STUBS

OpenRLHF's ``DeepspeedStrategy`` wraps the tiny model (OpenRLHF's ``Actor``) in a DeepSpeed ZeRO-2 engine
(bf16, AdamW, OpenRLHF's own DeepSpeed config) and takes steps on a fixed batch per rank. Every
``--every`` steps it saves the way OpenRLHF's PPO actor does (``PolicyModelActor.save_checkpoint`` with
``--ckpt.save_hf``): ``strategy.save_ckpt`` → DeepSpeed's ``CKPT/_actor/global_stepN/`` and
``strategy.save_model`` → ``CKPT/global_stepN_hf/``.

OpenRLHF is written for CUDA; three of its calls cannot run on a CPU-only torch and are replaced, each
recorded in ``CKPT/cpu_shims.json`` with the error it raises here:

* ``flash_attn`` (a required dependency that only builds with CUDA) is imported at module level by
  ``openrlhf.models.ring_attn_utils``: ``STUBS`` holds an empty stand-in package (never called: ring
  attention is off);
* ``DeepspeedStrategy.setup_distributed`` calls ``torch.cuda.set_device`` and builds its device mesh on
  ``cuda``: the same steps are taken with a ``cpu`` mesh (DeepSpeed picks its CPU accelerator and gloo);
* ``torch_dist_barrier_and_cuda_sync`` calls ``torch.cuda.synchronize``: the barrier alone is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace


def error_of(call) -> str | None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - recorded
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--saves", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--param-dtype", default="bf16", choices=("bf16", "fp16"))  # OpenRLHF's two choices
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import deepspeed
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoTokenizer

    import openrlhf.utils.deepspeed.deepspeed as ds_module
    from openrlhf.models import Actor
    from openrlhf.utils.deepspeed import DeepspeedStrategy

    ckpt = Path(args.ckpt)
    micro, world = 2, int(os.environ["WORLD_SIZE"])
    strategy_args = SimpleNamespace(
        local_rank=-1,
        ds=SimpleNamespace(param_dtype=args.param_dtype, zero_stage=2, tensor_parallel_size=1, ring_attn_size=1,
                           adam_offload=False, zpg=1, use_universal_ckpt=False, grad_accum_dtype=None,
                           overlap_comm=False, deepcompile=False),
        train=SimpleNamespace(dynamic_batch_enable=False, enable_ema=False),
    )
    strategy = DeepspeedStrategy(seed=0, max_norm=1.0, micro_train_batch_size=micro,
                                 train_batch_size=micro * world, zero_stage=2, args=strategy_args)

    shims = {"setup_distributed": error_of(strategy.setup_distributed)}
    # The CPU equivalent of setup_distributed: DeepSpeed's process group (gloo on its CPU accelerator), a cpu mesh.
    deepspeed.init_distributed()
    strategy.world_size = dist.get_world_size()
    strategy.ds_device_mesh = init_device_mesh("cpu", (strategy.world_size, 1, 1), mesh_dim_names=("dp", "sp", "tp"))
    strategy.setup_ring_attn(strategy.ds_device_mesh)
    strategy.accumulated_gradient = 1
    shims["torch_dist_barrier_and_cuda_sync"] = error_of(ds_module.torch_dist_barrier_and_cuda_sync)
    ds_module.torch_dist_barrier_and_cuda_sync = dist.barrier
    shims["flash_attn"] = f"stand-in package from {Path(sys.modules['flash_attn'].__file__).parent.parent.name}/"
    shims["deepspeed_accelerator"] = deepspeed.get_accelerator()._name
    shims["backend"] = dist.get_backend()

    actor = Actor(args.base, attn_implementation="eager", param_dtype=args.param_dtype,
                  ds_config=strategy.get_ds_train_config())
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    cfg = {"optim": "adam", "adam": {"lr": args.lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0},
           "lr_scheduler": "constant", "scheduler_steps": 1000, "max_norm": 1.0}
    actor, optimizer, scheduler = strategy.prepare((actor, cfg))
    engine = actor.model

    generator = torch.Generator().manual_seed(1000 + dist.get_rank())
    ids = torch.randint(0, 256, (micro, 24), generator=generator)
    losses, step = [], 0
    for _ in range(args.saves):
        for _ in range(args.every):
            loss = engine(input_ids=ids, labels=ids).loss
            strategy.backward(loss, actor, optimizer)
            strategy.optimizer_step(optimizer, actor, scheduler)
            step += 1
            losses.append(round(float(loss), 5))
        tag = f"global_step{step}"
        # As PolicyModelActor.save_checkpoint does with --ckpt.save_hf (max_num large: keep every DeepSpeed state).
        strategy.save_ckpt(engine, str(ckpt / "_actor"), tag, 100, 1000, {})
        strategy.save_model(actor, tokenizer, str(ckpt / f"{tag}_hf"))
    if dist.get_rank() == 0:
        (ckpt / "cpu_shims.json").write_text(json.dumps(shims, indent=1))
        (ckpt / "train_log.json").write_text(json.dumps({"param_dtype": args.param_dtype, "world_size": world,
                                                         "zero_stage": 2, "loss_rank0": losses}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
