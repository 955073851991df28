"""Register access by name, including registers wider than the 8-byte fast path."""
from vtlab import Guest


def test_wide_registers_go_through_the_sized_path():
    g = Guest("long")
    g.set_reg("rax", 0x1122334455667788)
    g.set_reg("xmm1", 1 << 100)
    assert g.reg("xmm1") == 1 << 100
    assert g.reg("rax") == 0x1122334455667788     # neighbours untouched
    assert isinstance(g.reg("st0"), int)


def test_narrow_registers_read_only_their_bytes():
    g = Guest("real")
    g.set_reg("edx", 0x12345678)
    g.reg("cr0")                                   # fills the scratch buffer with other bits
    assert g.reg("dl") == 0x78 and g.reg("dx") == 0x5678
