"""Stage B: preparation and launch, the step loop, steps and schedules, checkpoints, metrics,
native-size scoring, and what a run directory shows (reports, TensorBoard)."""
