"""What a run folder says, read back: per-round summaries and comparisons (`report`), the HTML page
(`html_report`, its figures in `plots`) and the bandwidth profile (`bandwidth`). Used by the server's CLI,
the simulation's and the benchmarks; nothing on a device needs it."""
