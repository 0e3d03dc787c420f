"""Everything Twilio: TwiML, webhook signatures, stream tokens, the REST client, dial-out,
the destination guard, the Media Streams handshake and serializer, caller IDs, keypad, transfer.
"""
