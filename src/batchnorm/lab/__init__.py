"""The lab: experiments that answer the classic questions about batch normalization."""
