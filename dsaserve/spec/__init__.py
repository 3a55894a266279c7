"""MTP (NEXTN) speculative decoding: the draft pass over a step's rows and the chained draft steps."""
