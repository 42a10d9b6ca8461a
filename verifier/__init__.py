"""amk-farm verifier: proves an artifact's schedule does what the model graph says.

`amk-farm verify ARTIFACT_DIR` (`verifier.verify.verify`): the artifact's files are read as
given and judged against the verifier's own model of the decode step (`verifier.model`), built
from the manifest's model spec; every claim is an obligation (`verifier.obligation`), one SMT
query proved with Z3 under a deterministic resource limit and a wall clock, in solver
processes that die with their parent (`verifier.solve`, `verifier.solvers`), its
counterexample replayed without the solver (`verifier.replay`). Classes so far: (b) index maps
(`verifier.index_maps`), (c) schedule (`verifier.happens_before`), (d) split reductions
(`verifier.reductions`), (e) attention (`verifier.attention`); kernel.cu's own task table is
read back (`verifier.kernel_table`); planted bugs in `verifier.mutate`.
"""
