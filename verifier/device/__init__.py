"""The verifier's reading of kernel.cu's device code (issue: prove the code that runs).

`nodes` is the syntax tree, `parse` reads kernel.cu into it (`source` tokens, `cursor` types,
`expr` expressions, `stmt` statements); the checks that judge the code
(its synchronization, the semantics of each task body) work on that tree, never on the
compiler's templates, so an edit anywhere in kernel.cu's device code is judged.
"""
