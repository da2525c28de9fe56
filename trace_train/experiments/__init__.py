"""Research tools around the trainer, apart from the product: the CPU demo (`demo`, `trace-train-demo`), the
method study (`study`, `trace-study`, with `stats`: t-intervals and paired differences), the warm start they
train from (`sft`), the plots of finished runs (`plot`) and the machine description their reports carry
(`machine`). They import the trainer; nothing in the trainer imports them."""
