"""Several processes as one model (mlx.launch): the group and its watchdog, what splits across
ranks and how, loading one rank's slices of the weights, and rank 0 driving the others in
lockstep.

May import: errors, options, model, inputs, generation, loading.
"""
