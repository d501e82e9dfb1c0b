"""The GLIPv2 network: config, Enc_V (Swin + FPN), Enc_L (BERT), Enc_VL (fusion), heads."""
