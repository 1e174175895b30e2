"""Environments as pes Systems: any gymnasium environment, policies in JAX, returns, files.

    system = pes.envs.Gymnasium("Hopper-v5", policy=pes.envs.Linear())
    theta0 = system.theta0()
    pes.envs.evaluate_return(system, theta0, key)      # {'return': ..., 'env_steps': ...}

gymnasium is imported only when an environment is made (``pip install 'pes[gym]'``).
:mod:`pes.envs.host` holds the helpers for wrapping any host simulator (docs/environments.md).
"""

from pes.envs.errors import EnvError
from pes.envs.gym import Gymnasium, GymState
from pes.envs.policies import MLP, ActionSpec, Linear, PolicyError, from_equinox, from_nnx
from pes.envs.policy_file import load_policy, save_policy
from pes.envs.returns import evaluate_return

__all__ = [
    "Gymnasium", "GymState", "Linear", "MLP", "ActionSpec", "EnvError", "PolicyError",
    "evaluate_return", "save_policy", "load_policy", "from_equinox", "from_nnx",
]
