"""The pure side of resharding's schedule, beside the planner: every rank's rounds as the executor
posts them (:mod:`.schedule`), a network model and the lower bound on it (:mod:`.network`), and a
discrete-event simulation of the schedule on that network (:mod:`.sim`). No torch.distributed."""
from .network import Bound, Network, lower_bound
from .schedule import SimChunk, SimMessage, rank_rounds
from .sim import SimResult, simulate

__all__ = ["Bound", "Network", "SimChunk", "SimMessage", "SimResult", "lower_bound", "rank_rounds", "simulate"]
