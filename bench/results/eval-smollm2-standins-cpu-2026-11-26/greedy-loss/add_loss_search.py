"""How profile-loss.json was made: the profile of the parent folder plus a greedy-loss search (4
candidates per step, up to 16 sublayers) on the same 2 search requests its other searches used,
i.e. what `adaskip calibrate ... --search kl,blockpruner,loss --search-candidates 6` would give
with loss left at 4 candidates.

    python add_loss_search.py ../profile.json profile-loss.json
"""
import sys

from adaskip import load_model
from adaskip.data import essay_paths
from adaskip.skipping.calibration import calibration_requests
from adaskip.skipping.greedy import search
from adaskip.skipping.profile import ImportanceProfile

source, target = sys.argv[1:3]
model, tok = load_model("smollm2")
profile = ImportanceProfile.load(source)
profile.check_model(model)
requests = calibration_requests((p.read_text(encoding="utf-8", errors="replace") for p in essay_paths()), tok,
                                num_requests=20, prompt_len=1024)
assert sum(len(r) for r in requests) == profile.tokens  # the profile's own calibration requests
profile.add_search(search(model, requests[:2], max_sublayers=16, method="loss", candidates=4, progress=True))
profile.save(target)
