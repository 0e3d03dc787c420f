"""An example of your own code an agent file can call (`python: mycompany.tools:…`)."""
