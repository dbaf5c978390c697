"""Choosing what to skip: offline calibration into an ImportanceProfile, greedy search, the
strategies and planners that turn a profile and a budget into a SkipPlan, and the cost model."""
from .calibration import calibrate
from .greedy import search
from .profile import ImportanceProfile
from .strategies import STRATEGIES, plan

__all__ = ["calibrate", "search", "ImportanceProfile", "plan", "STRATEGIES"]
