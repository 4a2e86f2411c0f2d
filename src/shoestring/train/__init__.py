"""The training loop only: the trainer, a budget's clock, the LR schedule, metrics, progress and
the run report. What the loop uses lives below it: the loss in `models.loss`, checkpoint files in
`shoestring.checkpoint`, memory accounting in `measure`, the run directory's names in `rundir`."""
