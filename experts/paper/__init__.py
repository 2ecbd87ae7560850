"""The paper's offline studies, computed in memory on one dataset over several seeds.

One module per concern, so a new study (the scaling study) adds its own runs and tables without
touching the others:

ladder  - the FM sizes both studies train (xs .. xl) and the one recipe they train by
plan    - how big a run is (users, which two FM sizes, FM steps, expert size), from a time budget
data    - a dataset loaded and cut into the time windows the studies use, and its surfaces
runs    - one seed's training: the FM variants (small, large, UE) and every expert variant
stats   - NE diffs, mean ± std over seeds, the Transfer Ratio, the four tables, the targets
report  - the markdown report, the PNG plots, the JSON-safe result and the files written
tables  - `run`: the paper's four tables end to end (`foundex paper-tables`)
scaling - `run`: FM NE and expert NE over a ladder of FM sizes, the power-law fit, TRs
          between sizes (`foundex scaling`); scaling_report writes its report and PNG

Point-in-time correctness without the store: each impression's TAE (and UE) is computed by the
FM from that user's events strictly before the impression's own timestamp (`TAEEngine` /
`compute_user_embeddings` read `UserHistories.lookup`, which excludes the request's own time),
i.e. the value that logging at serving time would have written and that the store's
point-in-time join would return. No Feast or Redis is needed.

Modules are imported by name (`experts.paper.tables`), not re-exported here, so that reading
one (say the statistics) does not pay for importing the training code.
"""
