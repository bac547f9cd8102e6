"""The HTTP API's routes, one module per resource: ``inference``, ``identities``, ``operations``.

Routes are thin: the body is parsed by a dependency, a use case (``cdface.serving.usecases``) does
the work, ``responses`` turns its result into the response model.
"""
