"""The command loops: train (synchronous OPD), distill, rollout, sweep and toy build, each a short
loop over `opdcli.stages` and `opdcli.run`. Nothing below the CLI imports a loop."""
