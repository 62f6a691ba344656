"""Expert parallelism, applied to a built model (the model files know nothing of it).

    init_distributed(timeout_s=60)              # torchrun env, finite collective timeout
    model = apply_expert_parallel(build_model())  # each rank keeps E/W experts
    opt = torch.optim.AdamW(model.parameters())   # after sharding
    loss = mean loss on this rank's batch; loss.backward()
    data_parallel_grads(model)                    # average replicated grads, expert grads / W
    opt.step()
    full = gather_expert_state(model)             # unsharded state dict, any rank
    load_full_state_dict(model, full)             # any full checkpoint into any W | E
    gather_optimizer_state(model, opt) / load_full_optimizer_state(model, opt, full)   # the same for Adam

    DP x EP ranks: mesh = init_mesh(ParallelLayout(expert_parallel=E, data_parallel=D), timeout_s)
    apply_expert_parallel(model, mesh.ep_group); use_global_balance_losses(model, mesh.balance_group)
    ddp = replicate_with_ddp(model, mesh.grad_group)   # train through ddp; after backward:
    reduce_expert_grads(model, W, mesh.dp_group); clip_grad_norm_(model, 1.0)

See docs/distributed.md.
"""

from .comm import Traffic, all_reduce_sum, all_to_all
from .data_parallel import (clip_grad_norm_, data_parallel_grads, expert_parameters, reduce_expert_grads,
                            replicate_with_ddp, replicated_parameters, sum_loads_over_ranks)
from .expert_parallel import (ExpertParallelMoELayer, apply_expert_parallel, expert_parallel_layers, traffic,
                              use_global_balance_losses)
from .launch import init_distributed, run_workers
from .mesh import ParallelLayout, ParallelMesh, init_mesh
from .placement import Placement
from .state import gather_expert_state, gather_optimizer_state, load_full_optimizer_state, load_full_state_dict

__all__ = [
    "ExpertParallelMoELayer",
    "ParallelLayout",
    "ParallelMesh",
    "Placement",
    "Traffic",
    "all_reduce_sum",
    "all_to_all",
    "apply_expert_parallel",
    "clip_grad_norm_",
    "data_parallel_grads",
    "expert_parallel_layers",
    "expert_parameters",
    "gather_expert_state",
    "gather_optimizer_state",
    "init_distributed",
    "init_mesh",
    "load_full_optimizer_state",
    "load_full_state_dict",
    "reduce_expert_grads",
    "replicate_with_ddp",
    "replicated_parameters",
    "run_workers",
    "sum_loads_over_ranks",
    "traffic",
    "use_global_balance_losses",
]
