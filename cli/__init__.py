"""The one `glipv2` command line, composed of each package's commands."""
