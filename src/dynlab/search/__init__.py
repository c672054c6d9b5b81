"""What every search shares, independent of any technique.

- `driver`: the one driver of every candidate search (S2DNAS's controller, SPOS's evolution): a
  search supplies how to propose a round of candidates and how to score one; the driver owns the
  ledger, the check that a resumed search is the same search, the RNG, where candidates run, and
  search_result.json;

- `seeds`: independent seeds per stream (candidate k, the sampler, ...), so a candidate's result
  depends on its index only, not on when or on which rank it runs;
- `candidates`: brief training of a candidate network on the datamodule's real loaders, driven by a
  small single-device Lightning Trainer (workers, pinned memory, AMP on GPU come with it);
- `bn`: BN recalibration on a fixed training subset (SPOS);
- `scoring`: exit probabilities and accuracies on the whole held-out val split;
- `ledger`: every evaluated candidate with its score and the search's own state, saved atomically
  after every round, so a killed or preempted search resumes at the next candidate;
- `result`: the search's outcome as search_result.json (every search's, FBNetV2's too), which a
  later run retrains from;
- `supernet`: a weight-sharing supernet as a one-exit dynamic model, deploying its active child;
- `ranks`: candidates spread over the ranks of a job (rank r takes every W-th), results
  all-gathered, only rank 0 writes, and a Slurm signal honoured at the next candidate boundary;
- `array`: or a step's candidates as one Slurm job array (submitit, settings from the run's
  `hydra/launcher=slurm`), records back into the ledger, lost tasks resubmitted.

Nothing here imports a technique: a technique passes its network builder, loss and score.
"""

from dynlab.search.array import ArrayConfig, CandidateFailed, evaluate_array, map_array
from dynlab.search.bn import recalibrate_bn
from dynlab.search.candidates import CandidateModule, CandidateTrainer, train_candidate
from dynlab.search.ledger import Ledger
from dynlab.search.ranks import all_gather_objects, evaluate_spread
from dynlab.search.result import RESULT, read_architecture, write_result
from dynlab.search.scoring import exit_accuracies, val_exit_probs
from dynlab.search.seeds import derived_seed, seeded
from dynlab.search.supernet import SupernetExits

__all__ = [
    "ArrayConfig",
    "CandidateFailed",
    "CandidateModule",
    "CandidateTrainer",
    "Ledger",
    "RESULT",
    "SupernetExits",
    "all_gather_objects",
    "derived_seed",
    "evaluate_array",
    "evaluate_spread",
    "exit_accuracies",
    "map_array",
    "read_architecture",
    "recalibrate_bn",
    "seeded",
    "train_candidate",
    "val_exit_probs",
    "write_result",
]
