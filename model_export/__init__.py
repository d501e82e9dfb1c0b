"""GLIPv2 model code: configuration, modules, processing, conversion and export."""
