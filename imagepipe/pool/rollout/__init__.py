"""Rollouts (`imagepipe rollout`): moving pools onto a new image version blue/green.

One home for everything a rollout is, in the core:

    records.py   what the store remembers: the rollout, its state, its progress per pool,
                 the keeper's heartbeat
    rules.py     the planner's rollout rules (pure): target version, drain deadline,
                 blue/green pacing (surge, canary, pause)
    progress.py  a rollout's next state after a keeper pass, from its pools (pure)
    driver.py    the keeper's side: heartbeat (written and read), policies for the planner,
                 judging after each pass, deadline warnings, rollback; `move_channel` is the
                 one place a rollout moves a channel (through the Channels port)
    control.py   the administrator's side: start, dry-run plan, follow, pause, resume,
                 cancel, undo (imagepipe/app/rollout.py opens it on the configured adapters)

Nothing is imported here, so the store and the planner can import records.py and rules.py
without pulling in the driver.
"""
