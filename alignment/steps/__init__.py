"""The alignment steps. Each `run(ctx) -> StepResult` runs both twins from the same initial state on the same
batch, logs what it compared on both sides, and compares every key through the policy."""
from . import backward, forward, loss, metric, schedule

STEPS = {"forward": forward.run, "loss": loss.run, "schedule": schedule.run, "backward": backward.run,
         "metric": metric.run}
ORDER = ("forward", "loss", "schedule", "backward", "metric")
