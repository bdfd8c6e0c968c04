"""Decode speed of the demo model from one checkout: `PYTHONPATH=CHECKOUT python3 benchmarks/demo_speed.py "dict(...)"`.

Loads the demo model with the given `moelite.load` keyword arguments (default budget 25%), warms up, then prints the
checkout folder, the arguments, three decode tok/s figures (120 greedy tokens each) and the torch thread count.
Alternate it between checkouts and arguments in one shell loop for an interleaved comparison.
"""
import sys, time, statistics, torch, moelite
kw = eval(sys.argv[1]) if len(sys.argv) > 1 else {}
e = moelite.load(None, **kw)
p = "To be or not to be, that is"
e.generate(p, max_tokens=8, temperature=0)
r = [e.generate(p, max_tokens=120, temperature=0).stats["decode_tok_s"] for _ in range(3)]
print(moelite.__file__.split("/")[2], kw, [round(x,1) for x in r], torch.get_num_threads())
