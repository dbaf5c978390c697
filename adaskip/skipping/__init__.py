"""Choosing what to skip: offline calibration into an ImportanceProfile, greedy search, the
strategies and planners that turn a profile and a budget into a SkipPlan, the cost model, and
the choice of a drafter for lossless speculative decoding."""
from .calibration import calibrate
from .drafting import DrafterChoice, plan_drafter
from .greedy import search
from .profile import ImportanceProfile
from .strategies import STRATEGIES, plan

__all__ = ["calibrate", "search", "ImportanceProfile", "plan", "STRATEGIES", "plan_drafter", "DrafterChoice"]
