# Installed by gradient-nb into the environment ({sys.prefix}/etc/ipython/), read by every IPython kernel of
# that environment at start (the user's profile, read after it, still overrides it). It only registers the
# JupyterLab Mesh panel's comm target and declares the gradient-nb magics lazily; it joins nothing. See
# gradient_nb/notebook/autojoin.py.
c = get_config()  # noqa: F821
c.InteractiveShellApp.extensions.append("gradient_nb.notebook.autojoin")
