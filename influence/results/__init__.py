"""What an analysis leaves on disk and how it is trusted again: names of every folder and file, the record
of what results depend on (so stale ones are refused and finished ones reused), score files read a block
at a time, top-k lists, the folder lock, and the preflight of disk and memory before work starts."""
