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

See docs/distributed.md.
"""

from .comm import Traffic, all_to_all
from .data_parallel import (clip_grad_norm_, data_parallel_grads, expert_parameters, replicated_parameters,
                            sum_loads_over_ranks)
from .expert_parallel import ExpertParallelMoELayer, apply_expert_parallel, expert_parallel_layers, traffic
from .launch import init_distributed, run_workers
from .placement import Placement
from .state import gather_expert_state, gather_optimizer_state, load_full_optimizer_state, load_full_state_dict

__all__ = [
    "ExpertParallelMoELayer",
    "Placement",
    "Traffic",
    "all_to_all",
    "apply_expert_parallel",
    "clip_grad_norm_",
    "data_parallel_grads",
    "expert_parallel_layers",
    "expert_parameters",
    "gather_expert_state",
    "gather_optimizer_state",
    "init_distributed",
    "load_full_optimizer_state",
    "load_full_state_dict",
    "replicated_parameters",
    "run_workers",
    "sum_loads_over_ranks",
    "traffic",
]
