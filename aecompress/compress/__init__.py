"""``aecompress compress``: a whole model by a closed-form method, its scales tuned, exported.

This layer owns the verb: the command (:mod:`.command`), the closed-form pipeline that every
budgeted method goes through (:mod:`.pipeline`), what a run chooses (:mod:`.choices`) and the
whole-model scale tune (:mod:`.tuning`). It sits above training (the tune is a Lightning run) and
below the benchmark, which measures the very forms this pipeline makes.
"""
