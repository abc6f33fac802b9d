"""The tolerances the tests compare float results at, and why each is what it is.

A tolerance lies between two scales. Below it: how far the same computation lands when only the order
of its float operations changes (another thread count, another CPU's vector kernels, ranks that reduce
in another order, compiled kernels, a batch of one against a batch). That must pass on any machine, so
each tolerance is well above what was measured. Above it: how far a defect moves the result, which must
fail. Measured with this suite on 2 cores (AMD EPYC), where the bounds below were at least 20 times
what any comparison showed, except where a constant says otherwise.

Where nothing can change the order (the same process, kernels and inputs: a reload, a copy, an
export), tests compare exactly. Numbers computed exactly but for their last rounding (shares of counts
such as recalls and top-1, learning-rate schedules, a value read back from a config) are compared with
pytest.approx's default, 1e-6 relative.
"""

# Unit-length float32 features, or probabilities, of one model computed twice in another order: our
# model against cn_clip's, transformers' or open_clip's implementation of the same layers, a batch of
# one against a batch, a rank's share against the whole, with padding against without. Measured: at
# most 3e-7 apart. A weight mapped to the wrong place, transposed or left out, or a padding token
# attended to, moves features by 1e-2 or more.
FEATURES = 1e-5

# Weights and losses of two float32 trainings of the same steps whose sums are grouped differently: two
# ranks against one process (gathered features, reduced or sharded gradients), activation
# checkpointing, the gradient cache, compiled blocks. Measured after 6 to 16 AdamW steps at lr 1e-3:
# weights at most 4.4e-7 apart, and 1.5e-5 where one run's blocks were compiled (20 times less than
# this); losses at most 1e-6 apart. A defect (a sample seen twice or not at all, a gradient not
# averaged, a frozen tensor trained, a learning rate off by a tenth) moves weights by 6e-4 or more.
TRAINING = 3e-4

# The same run again, or resumed from its checkpoints, on the same ranks: the same kernels sum in the
# same order. Measured: bitwise equal in every resumed run; two runs of one command once differed by
# 1e-8. A shifted random draw (an evaluation that draws, a resumed rank that masks other patches)
# moves weights by 1e-3.
REPEATED = 1e-6

# Evaluation scores, in percent, of features that are equal up to FEATURES or REPEATED. A score is a
# share of counted images or texts: it changes by a whole item (100 / items, 1 point or more for these
# sets) or not at all, unless two similarities lie within a rounding of each other. This absorbs the
# division and the JSON round trip.
SCORES = 1e-6
