"""Write a checkpoint series with verl's own ``FSDPCheckpointManager`` (run under torchrun, CPU, gloo).

    torchrun --standalone --nproc_per_node 2 verl_save.py --base BASE --out RUN --strategy fsdp2 --dtype bfloat16

Every rank loads the same tiny model from BASE (so no broadcast of the initial weights is needed), wraps it
the way verl's FSDP engine does (FSDP1: verl's ``get_fsdp_wrap_policy``, a device mesh, sharded state dicts;
FSDP2: verl's ``apply_fsdp2``), and takes AdamW steps on a fixed batch per rank (gradients averaged by FSDP).
``FSDPCheckpointManager.save_checkpoint`` writes ``RUN/global_step_N/actor/`` at step 0 (the base) and after
every ``--every`` optimizer steps. The one change from verl's engine: the device mesh is built on ``cpu``
(verl's ``create_device_mesh`` asks for the platform's accelerator, which a CPU-only host lacks; the
error text is written to ``RUN/verl_device_mesh_error.txt``), FSDP1 gets ``device_id=cpu`` and
``sync_module_states=False``.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=("fsdp", "fsdp2"), required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), required=True)
    parser.add_argument("--saves", type=int, default=6, help="checkpoints after the base")
    parser.add_argument("--every", type=int, default=2, help="optimizer steps between checkpoints")
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # FSDP1 / ShardedTensor deprecation notices
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardedStateDictConfig, ShardingStrategy, StateDictType
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl.utils.checkpoint.fsdp_checkpoint_manager import FSDPCheckpointManager
    from verl.utils.fsdp_utils import apply_fsdp2, get_fsdp_wrap_policy

    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)

    # verl's own mesh helper, as its FSDP engine calls it; on a CPU-only host it asks for the accelerator.
    try:
        from verl.workers.engine.fsdp.utils import create_device_mesh

        create_device_mesh(world_size=world, fsdp_size=-1)
        mesh_error = None
    except Exception as exc:  # noqa: BLE001 - recorded, then the mesh is built on cpu
        mesh_error = f"{type(exc).__name__}: {exc}"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "verl_device_mesh_error.txt").write_text((mesh_error or "none") + "\n")
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("fsdp",))

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if args.strategy == "fsdp":
        model = FSDP(model, auto_wrap_policy=get_fsdp_wrap_policy(model), device_id=torch.device("cpu"),
                     sharding_strategy=ShardingStrategy.FULL_SHARD, sync_module_states=False, device_mesh=mesh,
                     use_orig_params=False)
        FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT, ShardedStateDictConfig())
    else:
        apply_fsdp2(model, {"mesh": mesh, "reshard_after_forward": True}, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    manager = FSDPCheckpointManager(model=model, optimizer=optimizer, lr_scheduler=None,
                                    processing_class=tokenizer, checkpoint_config=None)

    # A fixed batch per rank: the same loss every step, so the weights drift along a smooth path.
    generator = torch.Generator().manual_seed(1000 + rank)
    ids = torch.randint(0, 256, (4, 24), generator=generator)
    losses = []
    step = 0
    for save in range(args.saves + 1):
        if save:
            for _ in range(args.every):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                step += 1
                losses.append(round(float(loss), 5))
        manager.save_checkpoint(str(out / f"global_step_{step}" / "actor"), global_step=step)
    if rank == 0:
        (out / "train_log.json").write_text(json.dumps({
            "strategy": args.strategy, "dtype": args.dtype, "world_size": world, "lr": args.lr,
            "steps_between_saves": args.every, "loss_rank0": losses,
        }, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
